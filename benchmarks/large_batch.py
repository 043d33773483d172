"""Large global batches: where SGD with momentum under the linear scaling rule stops converging,
and how far LARS and LAMB carry on (docs/performance.md, "Large batches").

    python benchmarks/large_batch.py [--ranks 2] [--batches 256,1024,4096,16384] [--epochs 16]

One task for every run: `mpinn data synth` rows from a random teacher network (32 features, 10
classes), --rows of them for training and 16,384 more held out (--val-fraction: the same rows
for every run), a 32-256-256-10 ReLU network, and a
fixed budget of epochs, so that a larger global batch makes fewer updates (what happens when a
job grows the batch with its ranks). Every run warms the rate up linearly over the first tenth of
its updates (Goyal et al. 2017), then decays it by a cosine. The rules:

    momentum         SGD with momentum 0.9, lr = base x B / 256 (the linear scaling rule)
    momentum, sqrt   the same with lr = base x sqrt(B / 256): is it the optimizer or the rule?
    lars             momentum 0.9, trust coefficient 0.001, weight decay 5e-4, lr = base x
                     sqrt(B / 256)
    lamb             weight decay 0.01, lr = base x sqrt(B / 256) (You et al. 2019's rule)

(LARS under the linear rule diverged here from B = 4,096 on at the base rate that was best at
256: the trust ratio already sizes each layer's step, and the linear rule oversizes it.) Each
rule's base rate is tuned once, at the smallest batch, from a short list (the best final
validation accuracy; momentum with the sqrt rule takes momentum's, the same rate at 256), and
kept for every batch, as a user who tuned a small run would. Prints
one markdown table: per rule and batch, the final validation accuracy, the updates made and the
updates taken to reach the target (99 % of the best accuracy at the smallest batch), then the
largest batch up to which each rule stays within 1 point of its own small-batch accuracy, and of
SGD's (momentum under the linear rule, the baseline).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# rule -> (its options, the base rates tried at the smallest batch, or the rule whose rate it takes)
RULES = {
    "momentum": (["--optimizer", "momentum", "--momentum", "0.9", "--lr-scale", "linear"],
                 (0.02, 0.05, 0.1, 0.2)),
    "momentum, sqrt": (["--optimizer", "momentum", "--momentum", "0.9", "--lr-scale", "sqrt"],
                       "momentum"),
    "lars": (["--optimizer", "lars", "--momentum", "0.9", "--weight-decay", "5e-4",
              "--lr-scale", "sqrt"], (1.0, 2.0, 4.0, 8.0)),
    "lamb": (["--optimizer", "lamb", "--weight-decay", "0.01", "--lr-scale", "sqrt"],
             (2e-3, 5e-3, 1e-2, 2e-2)),
}
BIN = Path(sys.executable).parent


def mpinn(ranks, *args):
    cmd = [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "mpinn", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")


VAL_ROWS = 16384


def train(ranks, rule, base, batch, epochs, rows, data, run_dir):
    """[(update, validation accuracy)] after each epoch of one training."""
    updates = epochs * -(-rows // batch)
    mpinn(ranks, "train", "--data", data, "--val-fraction", VAL_ROWS / (rows + VAL_ROWS),
          "--hidden", "256,256",
          "--batch-size", batch, "--epochs", epochs, "--lr", base, "--lr-ref-batch", 256,
          "--warmup-steps", max(1, updates // 10), "--lr-schedule", "cosine",
          "--shuffle", "global", "--progress", "lines", "--log-every", 1000,
          *RULES[rule][0], "--run-dir", run_dir, "--overwrite")
    records = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return [(r["step"], r["val_accuracy"]) for r in records if r["kind"] == "epoch"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batches", default="256,1024,4096,16384")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--out", default="", help="keep the data and runs here (default: a temp dir)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    root = Path(args.out or tempfile.mkdtemp(prefix="mpinn-large-batch-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"synth-{args.rows + VAL_ROWS}.h5"
    if not data.exists():
        mpinn(1, "data", "synth", "--out", data, "--rows", args.rows + VAL_ROWS, "--features", 32,
              "--classes", 10, "--hidden", "64", "--seed", 1)
    curves, tuned = {}, {}
    for rule, (_, rates) in RULES.items():
        if isinstance(rates, str):  # the rate another rule was tuned to, its run at batch 0
            tuned[rule], curves[rule, batches[0]] = tuned[rates], curves[rates, batches[0]]
        for base in () if isinstance(rates, str) else rates:
            curve = train(args.ranks, rule, base, batches[0], args.epochs, args.rows, data,
                          root / f"{rule}-{base}-{batches[0]}".replace(", ", "-"))
            print(f"tuning {rule} at batch {batches[0]}: base {base:g} -> {curve[-1][1]:.4f}",
                  flush=True)
            if rule not in tuned or curve[-1][1] > curves[rule, batches[0]][-1][1]:
                tuned[rule], curves[rule, batches[0]] = base, curve
        if not isinstance(rates, str) and tuned[rule] in (rates[0], rates[-1]):
            print(f"note: {rule}'s best base rate {tuned[rule]:g} is at an end of its list",
                  flush=True)
        for batch in batches[1:]:
            curves[rule, batch] = train(args.ranks, rule, tuned[rule], batch, args.epochs,
                                        args.rows, data,
                                        root / f"{rule}-{batch}".replace(", ", "-"))
            print(f"{rule} at batch {batch}: {curves[rule, batch][-1][1]:.4f}", flush=True)
    report(curves, tuned, batches, args)
    if not args.out:
        print(f"(runs kept in {root})")


def report(curves, tuned, batches, args):
    target = 0.99 * max(curves[rule, batches[0]][-1][1] for rule in tuned)
    print(f"\n{args.rows:,} training rows, {args.epochs} epochs, {args.ranks} ranks; target "
          f"{target:.4f} (99 % of the best accuracy at batch {batches[0]})\n")
    print("| rule (base rate) | " + " | ".join(f"B = {b:,}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for rule, base in tuned.items():
        cells = []
        for b in batches:
            curve = curves[rule, b]
            reached = next((step for step, acc in curve if acc >= target), None)
            cells.append(f"{curve[-1][1]:.4f} ({curve[-1][0]:,} updates; target "
                         + (f"at {reached:,})" if reached else "not reached)"))
        print(f"| {rule} ({base:g}) | " + " | ".join(cells) + " |")
    print()
    baseline = curves["momentum", batches[0]][-1][1]
    for rule in tuned:
        own = curves[rule, batches[0]][-1][1]
        print(f"{rule}: within 1 point of its own batch-{batches[0]} accuracy up to B = "
              f"{holds_to(curves, rule, batches, own):,}; of SGD's (momentum, linear rule) up to "
              f"B = {holds_to(curves, rule, batches, baseline):,}")


def holds_to(curves, rule, batches, accuracy):
    """The largest batch up to which every batch's final accuracy stays within 1 point of
    `accuracy` (the smallest batch when none does)."""
    largest = batches[0]
    for b in batches:
        if curves[rule, b][-1][1] < accuracy - 0.01:
            break
        largest = b
    return largest


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
