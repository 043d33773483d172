"""`--shuffle global` against `--shuffle rank`: wall time and peak memory per rank.

    python benchmarks/global_shuffle.py [ROWS] [FEATURES] [RANKS] [EPOCHS]

Writes a synthetic set (default 1,000,000 x 64, float32) in a temporary folder, then trains the
default network on it for EPOCHS (3) with each shuffle on RANKS (2) ranks, and prints wall times,
their ratio (target <= 1.5), each run's peak RSS per rank, and the global shuffle's extra memory
as a multiple of a rank's data shard (target <= 1.5).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def train(tmp, data, shuffle, ranks, epochs):
    run_dir = os.path.join(tmp, f"run-{shuffle}")
    t = time.perf_counter()
    subprocess.run([str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "mpinn", "train",
                    "--data", data, "--epochs", str(epochs), "--shuffle", shuffle, "--run-dir",
                    run_dir, "--log-every", "1000000"], check=True, capture_output=True)
    wall = time.perf_counter() - t
    summary = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][-1]
    return wall, max(summary["peak_rss_mb"]), max(summary["shard_mb"]), summary["global_shuffle_s"]


def main():
    rows, features, ranks, epochs = (int(a) for a in (sys.argv[1:] + ["1000000", "64", "2", "3"]
                                                       [len(sys.argv) - 1:])[:4])
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.h5")
        subprocess.run([sys.executable, "-m", "mpinn", "data", "synth", "--out", data, "--rows",
                        str(rows), "--features", str(features)], check=True, capture_output=True)
        rank = train(tmp, data, "rank", ranks, epochs)
        glob = train(tmp, data, "global", ranks, epochs)
    print(f"{rows:,} rows x {features} features, {ranks} ranks, {epochs} epochs, shard "
          f"{rank[2]:.0f} MB per rank")
    for name, (wall, rss, _, shuffle_s) in (("rank", rank), ("global", glob)):
        print(f"--shuffle {name:6s}: {wall:6.2f} s wall, peak RSS {rss:6.0f} MB per rank"
              + (f", exchange {shuffle_s:.2f} s in all" if name == "global" else ""))
    print(f"wall global / rank: {glob[0] / rank[0]:.2f} (target <= 1.5); extra memory: "
          f"{(glob[1] - rank[1]) / rank[2]:.2f} x the shard (target <= 1.5)")


if __name__ == "__main__":
    main()
