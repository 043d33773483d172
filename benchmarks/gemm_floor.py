"""The GEMM floor of one training step: its matrix multiplies alone (forward h@W, weight gradients
h^T d, input gradients d W^T except for the first layer), back to back through the BLAS mpinn's
Numba kernels call, at the step's shapes and in the kernels' layouts (hidden outputs feature-major,
the last layer row-major: kernels.py), on this process's thread limit.

    python benchmarks/gemm_floor.py --sizes 784-512-512-10 --batch 128 [--threads 1]

Prints one JSON object: the median milliseconds of those GEMMs, and GFLOP/s.
"""
import argparse
import json
import time

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401 - the BLAS mpinn's kernels call
from numba import njit
from numba.typed import List
from threadpoolctl import threadpool_limits

from mpinn.gemm import gemm_


@njit
def gemms(x, Ws, hs, gWs, ds):
    """hs[l]: layer l's output, (fo, N) for hidden layers and (N, K) for the last; ds likewise
    for dLoss/dz. The same calls, flags and operands as kernels.forward/backward_layers."""
    last = len(Ws) - 1
    for l in range(len(Ws)):
        if l == last:
            gemm_(l > 0, x if l == 0 else hs[l - 1], False, Ws[l], hs[l])
        else:
            gemm_(True, Ws[l], l == 0, x if l == 0 else hs[l - 1], hs[l])
    for l in range(last, -1, -1):
        d = hs[l] if l == last else ds[l]
        gemm_(l == 0, x if l == 0 else hs[l - 1], l != last, d, gWs[l])
        if l > 0:
            gemm_(False, Ws[l], l == last, d, ds[l - 1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    threadpool_limits(args.threads)
    sizes = [int(s) for s in args.sizes.split("-")]
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, sizes[0]), dtype=np.float32)
    Ws = List([rng.random((a, b), dtype=np.float32) for a, b in zip(sizes[:-1], sizes[1:])])
    hs = List([np.empty((b, args.batch), np.float32) for b in sizes[1:-1]]
              + [np.empty((args.batch, sizes[-1]), np.float32)])
    gWs = List([np.empty_like(W) for W in Ws])
    ds = List([np.empty((b, args.batch), np.float32) for b in sizes[1:-1]])
    gemms(x, Ws, hs, gWs, ds)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        gemms(x, Ws, hs, gWs, ds)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    flops = sum((4 if l == 0 else 6) * a * b * args.batch
                for l, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])))
    print(json.dumps({"floor_ms": med * 1e3, "gflops": flops / med / 1e9}))


if __name__ == "__main__":
    main()
