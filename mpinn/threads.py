"""BLAS thread limits per rank. Ranks x threads above the cores collapses speed, so the default
under MPI is one thread per rank (threadpoolctl, which also reaches the BLAS that Numba's np.dot
calls through SciPy)."""
import scipy.linalg.cython_blas  # noqa: F401 - load the BLAS Numba uses so the limit reaches it
from threadpoolctl import threadpool_limits

_limits = None


def limit_threads(n):
    """Limit every loaded BLAS/OpenMP pool to n threads for the rest of the process."""
    global _limits
    _limits = threadpool_limits(limits=int(n))
