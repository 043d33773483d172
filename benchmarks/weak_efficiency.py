"""2-rank weak-scaling efficiency on this machine: t(1 rank) / t(2 ranks), the batch per rank
fixed, side by side in one run (the scaling issue's targets: small >= 0.75, mnist-like >= 0.90,
wide >= 0.95).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        .venv/bin/python benchmarks/weak_efficiency.py [--repeats 3]

For each model (small 64-128-10 at 32 rows per rank, mnist-like 784-512-512-10 at 128, wide
1024-2048-2048-10 at 256) it runs `mpinn bench` on 1 rank and on 2 ranks in each setting (the
gradient summed in the node's shared memory, the default; MPI's Allreduce; the MPI-sharded
optimizer), alternately, REPEATS times, and prints the median step times (ms, whole step: data,
compute, sum, update) and efficiencies, with the 2-rank phases.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
MODELS = [("small", "64", "128", 32, 20000), ("mnist-like", "784", "512,512", 128, 300),
          ("wide", "1024", "2048,2048", 256, 40)]
SETTINGS = [("shared memory (default)", []), ("MPI Allreduce", ["--allreduce", "mpi"]),
            ("--shard-optimizer (MPI Reduce_scatter + Allgather)", ["--shard-optimizer"])]


def bench(ranks, features, hidden, rows, steps, extra):
    out = subprocess.run([BIN / "mpiexec", "-n", str(ranks), sys.executable, "-m", "mpinn",
                          "bench", "--features", features, "--hidden", hidden, "--batch-per-rank",
                          str(rows), "--steps", str(steps), "--warmup", "20", "--json", *extra],
                         capture_output=True, text=True, timeout=1800, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print("| model | setting | 1 rank (ms) | 2 ranks (ms) | efficiency | 2-rank compute / sum / "
          "update (ms) |\n|---|---|---|---|---|---|")
    for name, features, hidden, rows, steps in MODELS:
        one, two = [], {s: [] for s, _ in SETTINGS}
        for _ in range(args.repeats):
            one.append(bench(1, features, hidden, rows, steps, [])["step_ms"])
            for setting, extra in SETTINGS:
                two[setting].append(bench(2, features, hidden, rows, steps, extra))
        t1 = statistics.median(one)
        for setting, _ in SETTINGS:
            runs = sorted(two[setting], key=lambda r: r["step_ms"])
            mid = runs[len(runs) // 2]
            ph = mid["phases_ms"]
            print(f"| {name} | {setting} | {t1:.3f} | {mid['step_ms']:.3f} | "
                  f"{t1 / mid['step_ms']:.2f} | {ph['compute']['max']:.3f} / "
                  f"{ph['allreduce']['max']:.3f} / {ph['optimizer']['max']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
