"""Streaming training inputs from the file (--memory-budget) against holding them in memory.

    python benchmarks/streaming.py [FOLDER]

In FOLDER (default: a temporary folder; the files take 2.8 GB) it writes two synthetic sets:
mnist-like, 200,000 x 784, and 1,000,000 x 512 float32 (2 GB). Then, on 2 ranks:
  1. mnist-like 784-512-512-10, global batch 256, 600 steps, from memory and streamed with
     --memory-budget 64, for each --shuffle (none, rank, global): samples/s and their ratio
     (target >= 0.8), the file being in the page cache (it was just written and read);
  2. the 2 GB file with --memory-budget 256, 2,000 steps: the peak resident memory of each
     process (target <= 800 MB).
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent


def mpinn(*args):
    subprocess.run([sys.executable, "-m", "mpinn", *map(str, args)], check=True,
                   capture_output=True)


def train(folder, data, name, *args):
    run_dir = os.path.join(folder, f"run-{name}")
    subprocess.run([str(BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "mpinn", "train",
                    "--data", data, "--run-dir", run_dir, "--overwrite", "--log-every", "1000000",
                    *map(str, args)], check=True, capture_output=True)
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][-1]


def main(folder):
    mnist, big = os.path.join(folder, "mnist.h5"), os.path.join(folder, "big512.h5")
    if not os.path.exists(mnist):
        mpinn("data", "synth", "--out", mnist, "--rows", 200_000, "--features", 784)
    if not os.path.exists(big):
        mpinn("data", "synth", "--out", big, "--rows", 1_000_000, "--features", 512)
    common = ["--hidden", "512,512", "--batch-size", 256, "--steps", 600]
    print("mnist-like 784-512-512-10, 2 ranks, global batch 256, 600 steps (samples/s):")
    for shuffle in ("none", "rank", "global"):
        memory = train(folder, mnist, "memory", *common, "--shuffle", shuffle)
        streamed = train(folder, mnist, "streamed", *common, "--shuffle", shuffle,
                         "--memory-budget", 64)
        print(f"  --shuffle {shuffle:6s}: memory {memory['samples_per_s']:8,.0f} (peak RSS "
              f"{max(memory['peak_rss_mb']):4.0f} MB), streamed {streamed['samples_per_s']:8,.0f} "
              f"(peak RSS {max(streamed['peak_rss_mb']):4.0f} MB): "
              f"{streamed['samples_per_s'] / memory['samples_per_s']:.2f} (target >= 0.8)")
    run = train(folder, big, "big", "--memory-budget", 256, "--steps", 2000, "--batch-size", 256)
    print(f"1,000,000 x 512 (2 GB), 2 ranks, --memory-budget 256: peak RSS per process "
          f"{', '.join(f'{m:.0f}' for m in run['peak_rss_mb'])} MB (target <= 800), "
          f"{run['samples_per_s']:,.0f} samples/s")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
