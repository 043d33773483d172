"""Thread limits per rank (--threads): BLAS pools through threadpoolctl, which also reaches the BLAS
that Numba's np.dot calls through SciPy, and Numba's own threads. Ranks x threads above the cores
collapses speed, so the default is one thread per rank, with a warning when oversubscribed."""
import os

import numba
import scipy.linalg.cython_blas  # noqa: F401 - load the BLAS Numba uses so the limit reaches it
from threadpoolctl import threadpool_limits

_limits = None


def limit_threads(n):
    """Limit every loaded BLAS/OpenMP pool, and Numba's threads, to n for the rest of the run."""
    global _limits
    _limits = threadpool_limits(limits=int(n))
    numba.set_num_threads(min(int(n), numba.config.NUMBA_NUM_THREADS))


def oversubscription(ranks_on_node, threads, cores=None, where="node"):
    """A warning text when ranks x threads exceed the node's (or machine's) cores, else None."""
    cores = cores or os.cpu_count() or 1
    if ranks_on_node * threads > cores:
        return (f"{ranks_on_node} ranks x {threads} thread(s) on this {where} exceed its {cores} "
                "cores; expect slow steps (fine for testing, not for timing)")
    return None
