"""What the machine gives the kernels: the BLAS that Numba's matrix multiplies call (library,
version, the kernel it chose: threadpoolctl's `architecture`), the CPU's vector extensions, the
measured single-precision GEMM peak, and a warning when an environment override (OPENBLAS_CORETYPE)
makes OpenBLAS run a slower kernel than this CPU supports."""
import os
import time

import numpy as np

# OpenBLAS kernel names by the widest vector extension they need, slowest first
KERNEL_RANK = {"Haswell": 1, "Zen": 1, "SkylakeX": 2, "Cooperlake": 2, "SapphireRapids": 2}


def blas():
    """(internal_api, version, architecture, file) of the BLAS Numba's np.dot uses (SciPy's)."""
    import scipy.linalg.cython_blas  # noqa: F401 - the BLAS Numba calls
    from threadpoolctl import threadpool_info
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    # SciPy's own copy lives in scipy.libs/ (numpy's, in numpy.libs/, has a similar file name)
    chosen = next(
        (p for p in pools if "/scipy.libs/" in p["filepath"]), pools[0] if pools else None
    )
    if chosen is None:
        return {"library": "unknown", "version": "", "architecture": ""}
    return {"library": chosen["internal_api"], "version": chosen.get("version") or "",
            "architecture": chosen.get("architecture") or ""}


def cpu_has_avx512():
    try:
        with open("/proc/cpuinfo") as fh:
            return " avx512f" in fh.read()
    except OSError:
        return False


def override_warning(info, has_avx512=None, env=os.environ):
    """A warning text when OPENBLAS_CORETYPE pins OpenBLAS to a kernel slower than the CPU's."""
    forced = env.get("OPENBLAS_CORETYPE")
    if not forced or info["library"] != "openblas":
        return None
    has_avx512 = cpu_has_avx512() if has_avx512 is None else has_avx512
    if has_avx512 and KERNEL_RANK.get(info["architecture"], 2) < 2:
        return (f"OPENBLAS_CORETYPE={forced} makes OpenBLAS run its {info['architecture']} "
                "(AVX2) kernels on a CPU with AVX-512: matrix multiplies run at about half speed. "
                "Unset OPENBLAS_CORETYPE (and OPENBLAS_L2_SIZE) for this command if your OpenBLAS "
                "is recent")
    return None


def sgemm_peak(n=1024, reps=5):
    """GFLOP/s of an n x n x n float32 GEMM through the same BLAS, best of reps, with the thread
    limit in force."""
    from scipy.linalg import blas as scipy_blas
    a = np.asfortranarray(np.random.default_rng(0).random((n, n), dtype=np.float32))
    scipy_blas.sgemm(1.0, a, a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        scipy_blas.sgemm(1.0, a, a)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9
