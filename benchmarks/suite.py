"""mpinn against JAX and PyTorch on this machine, side by side in one run (`make bench`).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/suite.py [--steps 200]

For each model (small 64-128-10 batch 32, mnist-like 784-512-512-10 batch 128, wide
1024-2048-2048-10 batch 256) and layout (1 rank x 1 thread, 1 rank x 2 threads, 2 ranks x 1
thread with the batch per rank fixed: mpinn over MPI, JAX with mpi4jax's allreduce inside its jit
step (when mpi4jax is installed), PyTorch DDP over gloo) it runs the tools alternately, twice
each, SGD with momentum, float32, synthetic data in memory, warm-up then --steps timed steps, and
keeps each tool's faster median step time. Every tool times its step with the batch already in
place (mpinn: `engine_step_ms` of `mpinn bench`). Each step is also given as a multiple of the
same run's GEMM floor (benchmarks/gemm_floor.py: the step's matrix multiplies alone). Also: the
BLAS kernel in use and its sgemm peak, gradient overlap on/off, per-rank memory and shard read
speed on a synthetic HDF5 file of 1 million rows, and JIT start-up cold and warm. Writes Markdown.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MODELS = [("small", (64, 128, 10), 32), ("mnist-like", (784, 512, 512, 10), 128),
          ("wide", (1024, 2048, 2048, 10), 256)]
LAYOUTS = [("1 rank x 1 thread", 1, 1), ("1 rank x 2 threads", 1, 2), ("2 ranks x 1 thread", 2, 1)]


def sh(cmd, env=None, timeout=3600):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{p.stderr[-2000:]}")
    return p.stdout


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def training_flops(sizes, rows):
    return sum((4 if l == 0 else 6) * a * b * rows
               for l, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])))


def mpinn_step(sizes, batch, ranks, threads, steps, overlap=0.0):
    out = sh([BIN / "mpiexec", "-n", ranks, sys.executable, "-m", "mpinn", "bench", "--features",
              sizes[0], "--hidden", ",".join(map(str, sizes[1:-1])), "--classes", sizes[-1],
              "--batch-per-rank", batch, "--threads", threads, "--steps", steps, "--warmup", 20,
              "--overlap-mb", overlap, "--json"], env={"OMP_NUM_THREADS": str(threads)})
    return last_json(out)["engine_step_ms"]


def jax_step(sizes, batch, ranks, threads, steps):
    cmd = [sys.executable, HERE / "jax_bench.py", "--sizes", "-".join(map(str, sizes)),
           "--batch", batch, "--ranks", ranks, "--threads", threads, "--steps", steps]
    if ranks > 1:
        cmd = [BIN / "mpiexec", "-n", ranks] + cmd
    return last_json(sh(cmd))["step_ms"]


def floor_step(sizes, batch, threads, steps):
    return last_json(sh([sys.executable, HERE / "gemm_floor.py", "--sizes",
                         "-".join(map(str, sizes)), "--batch", batch, "--threads", threads,
                         "--steps", min(steps, 50)]))["floor_ms"]


def torch_step(sizes, batch, ranks, threads, steps, tries=3):
    cmd = [sys.executable, HERE / "torch_bench.py", "--sizes", "-".join(map(str, sizes)),
           "--batch", batch, "--ranks", ranks, "--threads", threads, "--steps", steps]
    for attempt in range(tries):  # gloo start-up occasionally fails on a busy machine: retry
        try:
            return last_json(sh(cmd, env={"OMP_NUM_THREADS": str(threads)}))["step_ms"]
        except SystemExit:
            if attempt == tries - 1:
                raise


PEAK = """
import sys, time, numpy as np
from threadpoolctl import threadpool_limits
threadpool_limits(int(sys.argv[1]))
n = 2048
a = np.random.rand(n, n).astype(np.float32); c = np.empty_like(a)
if sys.argv[2] == "scipy":
    from scipy.linalg import blas
    af = np.asfortranarray(a)
    f = lambda: blas.sgemm(1.0, af, af)
else:
    f = lambda: np.dot(a, a, out=c)
f(); ts = []
for _ in range(10):
    t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
print(2 * n ** 3 / min(ts) / 1e9)
"""


def sgemm_peak(threads, lib):
    return float(sh([sys.executable, "-c", PEAK, threads, lib],
                    env={"OMP_NUM_THREADS": str(threads)}).strip())


def have(module):
    return subprocess.run([sys.executable, "-c", f"import {module}"],
                          capture_output=True).returncode == 0


def peers_available():
    """Which peers run here: PyTorch, JAX, and JAX at 2 ranks (mpi4jax)."""
    return {"torch": have("torch"), "jax": have("jax"), "jax2": have("mpi4jax")}


def blas_line():
    import scipy.linalg.cython_blas  # noqa: F401
    from threadpoolctl import threadpool_info
    pool = next(p for p in threadpool_info() if "/scipy.libs/" in p["filepath"])
    forced = {
        k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ
    }
    return (f"BLAS: {pool['internal_api']} {pool['version']}, kernel {pool['architecture']} "
            f"(threadpoolctl){'; environment forces ' + str(forced) if forced else ''}.")


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "–"


def compare(steps, lines, rounds=2):
    peers = peers_available()
    torch_ok = peers["torch"]
    measured = {(t, lib): sgemm_peak(t, lib) for t in (1, 2) for lib in ("numpy", "scipy")}
    peaks = {t: max(measured[(t, "numpy")], measured[(t, "scipy")]) for t in (1, 2)}
    lines += ["## sgemm peak (2048 x 2048 x 2048, float32)", "",
              "| threads | numpy GFLOP/s | SciPy BLAS (what mpinn's kernels call) GFLOP/s |",
              "|---|---|---|"]
    for t in (1, 2):
        lines.append(f"| {t} | {measured[(t, 'numpy')]:.1f} | {measured[(t, 'scipy')]:.1f} |")
    lines += ["", blas_line(), "",
              "## mpinn vs JAX and PyTorch (samples/s; step as a multiple of the GEMM floor)", "",
              "| model | layout | mpinn | JAX | mpinn/JAX | PyTorch | mpinn/PyTorch | GEMM floor "
              "(ms) | mpinn step/floor | JAX step/floor | mpinn % of sgemm peak |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    results = {}
    for name, sizes, batch in MODELS:
        for layout, ranks, threads in LAYOUTS:
            t = {"mpinn": [], "jax": [], "torch": [], "floor": []}
            for _ in range(rounds):  # alternately, so all see the same machine
                t["mpinn"].append(mpinn_step(sizes, batch, ranks, threads, steps))
                if peers["jax"] and (ranks == 1 or peers["jax2"]):
                    t["jax"].append(jax_step(sizes, batch, ranks, threads, steps))
                if torch_ok:
                    t["torch"].append(torch_step(sizes, batch, ranks, threads, steps))
                t["floor"].append(floor_step(sizes, batch, threads, steps))
            best = {k: min(v) if v else None for k, v in t.items()}
            rows = batch * ranks
            sps = {k: rows / (v / 1e3) if v else None for k, v in best.items()}
            flops = training_flops(sizes, rows) / (best["mpinn"] / 1e3) / 1e9
            peak = peaks[1] * ranks if threads == 1 else peaks[2]
            results[(name, ranks, threads)] = best
            fmt = lambda v: f"{v:,.0f}" if v else "–"  # noqa: E731
            lines.append(
                f"| {name} | {layout} | {fmt(sps['mpinn'])} | {fmt(sps['jax'])} | "
                f"{ratio(sps['mpinn'], sps['jax'])} | {fmt(sps['torch'])} | "
                f"{ratio(sps['mpinn'], sps['torch'])} | {best['floor']:.3f} | "
                f"{best['mpinn'] / best['floor']:.2f} | "
                f"{best['jax'] / best['floor'] if best['jax'] else 0:.2f} | "
                f"{100 * flops / peak:.0f}% |")
            print(lines[-1], flush=True)
    lines += ["", "2-rank weak scaling (batch per rank fixed): efficiency = t(1 rank) / t(2 ranks)",
              "", "| model | mpinn | JAX + mpi4jax | PyTorch DDP (gloo) |", "|---|---|---|---|"]
    for name, _, _ in MODELS:
        one, two = results[(name, 1, 1)], results[(name, 2, 1)]
        eff = {k: f"{100 * one[k] / two[k]:.0f}%" if one[k] and two[k] else "–"
               for k in ("mpinn", "jax", "torch")}
        lines.append(f"| {name} | {eff['mpinn']} | {eff['jax']} | {eff['torch']} |")
    return results


def overlap(steps, lines):
    lines += ["", "## Gradient overlap (2 ranks x 1 thread, step ms, alternately, best of 3)", "",
              "| model | one Allreduce after backward | 4 MiB buckets during backward |",
              "|---|---|---|"]
    for name, sizes, batch in MODELS[1:]:
        off, on = [], []
        for _ in range(3):
            off.append(mpinn_step(sizes, batch, 2, 1, steps))
            on.append(mpinn_step(sizes, batch, 2, 1, steps, overlap=4.0))
        lines.append(f"| {name} | {min(off):.2f} | {min(on):.2f} |")
        print(lines[-1], flush=True)


def memory(lines, rows=1_000_000, features=64):
    import h5py
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.h5")
        rng = np.random.default_rng(0)
        with h5py.File(path, "w") as f:
            X = f.create_dataset("X", (rows, features), np.float32)
            for s in range(0, rows, 100_000):
                X[s:s + 100_000] = rng.normal(size=(100_000, features)).astype(np.float32)
            f["y"] = rng.integers(0, 10, rows)
        size_mb = os.path.getsize(path) / 2**20
        t = time.perf_counter()
        with open(path, "rb") as fh:  # into a fresh array, as a shard read is (page faults too)
            fh.readinto(np.empty(os.path.getsize(path), np.uint8))
        raw = size_mb / (time.perf_counter() - t)
        lines += [
            "",
            f"## Memory and data path ({rows:,} rows x {features} float32: "
            f"{size_mb:,.0f} MiB file; reading its bytes straight into a new array: {raw:,.0f} "
            "MiB/s, page cache warm)",
            "",
            "| ranks | shard per rank (MiB) | peak RSS per rank (MiB) | shard read, slowest rank "
            "(MiB/s) |",
            "|---|---|---|---|",
        ]
        for ranks in (1, 2):
            run_dir = os.path.join(tmp, f"r{ranks}")
            sh([BIN / "mpiexec", "-n", ranks, sys.executable, "-m", "mpinn", "train", "--data",
                path, "--val-data", "", "--hidden", "128", "--batch-size", 1024, "--steps", 20,
                "--run-dir", run_dir])
            s = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))][-1]
            speed = min(m / t for m, t in zip(s["shard_mb"], s["shard_read_s"]))  # slowest rank
            lines.append(f"| {ranks} | {max(s['shard_mb']):,.0f} | {max(s['peak_rss_mb']):,.0f} | "
                         f"{speed:,.0f} |")
            print(lines[-1], flush=True)
        base = sh([sys.executable, "-c", "import mpinn.train, mpinn.runtime.process;"
                   "print(mpinn.runtime.process.peak_rss_mb())"])
        lines += ["", f"A Python process with mpinn, NumPy, Numba, h5py and MPI imported holds "
                  f"{float(base):,.0f} MiB before any data."]


def startup(lines):
    lines += ["", "## Start-up (2 ranks, bundled digits; kernels = compile or cache load)", "",
              "| Numba cache | kernels ready (s) | first step after process start (s) |",
              "|---|---|---|"]
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold (empty cache)", "warm"):
            with tempfile.TemporaryDirectory() as run_dir:
                sh([BIN / "mpiexec", "-n", 2, sys.executable, "-m", "mpinn", "train", "--epochs",
                    1, "--run-dir", run_dir], env={"NUMBA_CACHE_DIR": cache})
                s = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))][-1]
            lines.append(f"| {label} | {s['kernels_s']:.2f} | {s['startup_s']:.2f} |")
            print(lines[-1], flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--rounds", type=int, default=2,
                   help="alternated runs per tool in the comparison; each keeps its best")
    p.add_argument("--skip", default="", help="comma-separated: compare,overlap,memory,startup")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    lines = ["# mpinn benchmark results", "",
             f"`python benchmarks/suite.py --steps {args.steps} --rounds {args.rounds}"
             + (f" --skip {args.skip}" if args.skip else "") + f"` on {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d')}. Median step time over {args.steps} timed steps, the "
             f"best of {args.rounds} alternated runs per tool.", ""]
    for name, fn in (("compare", lambda: compare(args.steps, lines, args.rounds)),
                     ("overlap", lambda: overlap(args.steps, lines)),
                     ("memory", lambda: memory(lines)), ("startup", lambda: startup(lines))):
        if name not in skip:
            fn()
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
