"""The GEMM floor of one training step: its matrix multiplies alone (forward h@W, weight gradients
h^T d, input gradients d W^T except for the first layer), back to back through the BLAS mpinn's
Numba kernels call, at the step's shapes and layouts, on this process's thread limit.

    python benchmarks/gemm_floor.py --sizes 784-512-512-10 --batch 128 [--threads 1]

Prints one JSON object: the median milliseconds of those GEMMs, and GFLOP/s.
"""
import argparse
import json
import time

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401 - the BLAS Numba's np.dot calls
from numba import njit
from numba.typed import List
from threadpoolctl import threadpool_limits


@njit
def gemms(x, Ws, zs, gWs, ds):
    h = x
    for l in range(len(Ws)):
        np.dot(h, Ws[l], zs[l])
        h = zs[l]
    for l in range(len(Ws) - 1, -1, -1):
        np.dot(x.T if l == 0 else zs[l - 1].T, zs[l], gWs[l])
        if l > 0:
            np.dot(zs[l], Ws[l].T, ds[l - 1])


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
    zs = List([np.empty((args.batch, b), np.float32) for b in sizes[1:]])
    gWs = List([np.empty_like(W) for W in Ws])
    ds = List([np.empty((args.batch, b), np.float32) for b in sizes[1:-1]])
    gemms(x, Ws, zs, gWs, ds)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        gemms(x, Ws, zs, gWs, ds)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    flops = sum((4 if l == 0 else 6) * a * b * args.batch
                for l, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])))
    print(json.dumps({"floor_ms": med * 1e3, "gflops": flops / med / 1e9}))


if __name__ == "__main__":
    main()
