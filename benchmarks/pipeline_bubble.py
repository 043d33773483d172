"""Pipeline bubble and activation memory: measured vs the ideal (S-1)/(M+S-1).

    python benchmarks/pipeline_bubble.py [--stages 2] [--micro 1,2,4,8] \\
        [--hidden 1024,1024,1024,1024]

Trains a compute-heavy MLP on synthetic data (a temporary HDF5 file) with `mpiexec -n S` in pipeline
mode for each schedule and micro-batch count, plus 1 rank data parallel for reference, and prints a
Markdown table: per-stage measured bubble (time waiting on communication / time in the pipeline
phase), the ideal bubble, peak activation memory per stage, and samples/s relative to 1 rank.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np


def write_data(path, rows, features, classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = (x[:, :classes] + 0.1 * rng.normal(size=(rows, classes))).argmax(1)
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = x, y.astype(np.int64)


def train(ranks, data, run_dir, args, extra):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", str(ranks), sys.executable, "-m", "mpinn", "train", "--data", data,
           "--val-data", "", "--hidden", args.hidden, "--batch-size", str(args.batch),
           "--steps", str(args.steps), "--epochs", "1000", "--optimizer", "sgd", "--lr", "0.01",
           "--log-every", str(args.steps), "--run-dir", run_dir, "--no-shuffle", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))][-1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--micro", default="1,2,4,8")
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--hidden", default="1024,1024,1024,1024")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    micro = [int(m) for m in args.micro.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "synthetic.h5")
        write_data(data, args.batch * args.steps, args.features, 10)
        base = train(1, data, os.path.join(tmp, "base"), args, [])["samples_per_s"]
        print(f"model {args.features}-{args.hidden.replace(',', '-')}-10, global batch "
              f"{args.batch}, {args.steps} timed steps, S = {args.stages}; 1 rank data parallel: "
              f"{base:,.0f} samples/s\n")
        print("| schedule | M | ideal bubble | measured bubble per stage | peak activations per "
              "stage (MiB) | samples/s | vs 1 rank |")
        print("|---|---|---|---|---|---|---|")
        for kind in ("gpipe", "1f1b"):
            for m in micro:
                s = train(args.stages, data, os.path.join(tmp, f"{kind}{m}"), args,
                          ["--pipeline-stages", str(args.stages), "--micro-batches", str(m),
                           "--schedule", kind])
                bubbles = ", ".join(f"{st['bubble']:.3f}" for st in s["stages"])
                mem = ", ".join(f"{st['activation_bytes'] / 2**20:.1f}" for st in s["stages"])
                print(f"| {kind} | {m} | {s['ideal_bubble']:.3f} | {bubbles} | {mem} | "
                      f"{s['samples_per_s']:,.0f} | {s['samples_per_s'] / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
