"""mpinn next to scikit-learn's MLP on the real data sets scikit-learn ships (docs/tabular.md).

    python benchmarks/tabular.py [--ranks 2] [--splits 10] [--sets wine,digits] [--out DIR]

For breast cancer, wine and digits (classification) and diabetes (regression): --splits splits
(train_test_split, test 25 %, random_state 0..N-1, stratified for classes), each written as CSV and
as Parquet; split k also seeds both tools' initial weights and shuffles (random_state, --seed), so
that the means average over the data's split and the network's initialisation alike. Both tools
train on all the training rows and see the test rows only at the end. scikit-learn:
make_pipeline(StandardScaler(), MLPClassifier) (for regression MLPRegressor, its targets
standardised by TransformedTargetRegressor) with 100 hidden units and its defaults: Adam, lr 1e-3,
batches of min(200, rows), L2 alpha 1e-4, 200 epochs at most (it stops earlier when the training
loss stalls for 10). mpinn, on `--ranks` ranks, from each file format (the CSV through `mpinn data
convert`, the Parquet read directly): the same network and optimizer, --scale-inputs standard
(--scale-targets standard for regression), --weight-decay alpha / 200 (the same L2 strength),
--weight-init glorot (scikit-learn's initial weights; mpinn's default, He-normal, is wider), 200
epochs, then `mpinn evaluate` on the test rows. Every figure is the mean (± standard deviation)
over the splits, so that one lucky split decides nothing. Prints one markdown table of test
metrics.
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
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn import datasets, metrics
from sklearn.compose import TransformedTargetRegressor
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

SETS = {"breast cancer": (datasets.load_breast_cancer, "cls"),
        "wine": (datasets.load_wine, "cls"),
        "digits": (datasets.load_digits, "cls"),
        "diabetes": (datasets.load_diabetes, "reg")}
HIDDEN, EPOCHS = 100, 200
# scikit-learn's L2 term is alpha / (2 x batch rows) x |W|^2, so its gradient alpha / batch x W:
# mpinn's --weight-decay (added to the gradient) of the same strength is alpha / batch
ALPHA = 1e-4


def write_tables(folder, name, x, y):
    """name-{part}.csv and .parquet for each part (train, test): features f0.., target last."""
    paths = {}
    for part, xp, yp in (("train", x[0], y[0]), ("test", x[1], y[1])):
        cols = {f"f{i}": xp[:, i] for i in range(xp.shape[1])}
        cols["target"] = yp
        stem = folder / f"{name}-{part}"
        pq.write_table(pa.table(cols), f"{stem}.parquet")
        header = ",".join(cols)
        np.savetxt(f"{stem}.csv", np.column_stack([xp, yp]), delimiter=",", header=header,
                   comments="", fmt=["%.17g"] * xp.shape[1] + ["%d" if yp.dtype.kind == "i"
                                                                else "%.17g"])
        paths[part] = stem
    return paths


def mpinn(*args, ranks=1):
    cmd = ([str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)] if ranks > 1
           else []) + [sys.executable, "-m", "mpinn", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def run_mpinn(train, test, y_key, kind, names, folder, ranks, seed):
    """Train on `train`, evaluate the trained network on `test`."""
    run = folder / f"run-{Path(train).stem}"
    task = (["--scale-targets", "standard", "--loss", "mse"] if kind == "reg" else [])
    t0 = time.perf_counter()
    mpinn("train", "--data", train, "--y-key", y_key, "--scale-inputs", "standard", *task,
          "--hidden", HIDDEN, "--epochs", EPOCHS, "--batch-size", 200, "--optimizer", "adam",
          "--lr", "1e-3", "--weight-decay", ALPHA / 200, "--weight-init", "glorot",
          "--run-dir", run, "--progress", "lines",
          "--overwrite", "--seed", seed, ranks=ranks)
    seconds = time.perf_counter() - t0
    out = json.loads(mpinn("evaluate", "--checkpoint", run / "checkpoint.h5", "--data", test,
                           "--y-key", y_key, "--metrics", ",".join(names), "--json"))
    return figures(out, kind), seconds


def figures(result, kind):
    if kind == "cls":
        return {"accuracy": result["accuracy"], "f1": result["f1"]["macro"],
                "roc_auc": result["roc_auc"]}
    return {"r2": result["r2"]["mean"], "rmse": result["rmse"]["mean"],
            "mae": result["mae"]["mean"]}


def run_sklearn(x, y, kind, seed):
    model = (MLPClassifier if kind == "cls" else MLPRegressor)(
        hidden_layer_sizes=(HIDDEN,), random_state=seed, max_iter=EPOCHS)
    pipe = make_pipeline(StandardScaler(), model)
    if kind == "reg":
        pipe = TransformedTargetRegressor(pipe, transformer=StandardScaler())
    t0 = time.perf_counter()
    pipe.fit(x[0], y[0])
    seconds = time.perf_counter() - t0
    if kind == "reg":
        pred = pipe.predict(x[1])
        return {"r2": metrics.r2_score(y[1], pred),
                "rmse": metrics.root_mean_squared_error(y[1], pred),
                "mae": metrics.mean_absolute_error(y[1], pred)}, seconds
    prob = pipe.predict_proba(x[1])
    auc = (metrics.roc_auc_score(y[1], prob[:, 1]) if prob.shape[1] == 2
           else metrics.roc_auc_score(y[1], prob, multi_class="ovr", average="macro"))
    return {"accuracy": metrics.accuracy_score(y[1], prob.argmax(1)),
            "f1": metrics.f1_score(y[1], prob.argmax(1), average="macro"),
            "roc_auc": auc}, seconds


def one_split(name, load, kind, seed, folder, ranks):
    """{tool: {metric: value}} and {tool: seconds} of one train/test split (random_state seed)."""
    x_all, y_all = load(return_X_y=True)
    split = train_test_split(x_all, y_all, test_size=0.25, random_state=seed,
                             stratify=y_all if kind == "cls" else None)
    x, y = split[:2], split[2:]  # (train, test) each
    paths = write_tables(folder, f"{name.replace(' ', '_')}-{seed}", x, y)
    names = ["accuracy", "f1", "roc_auc"] if kind == "cls" else ["r2", "rmse", "mae"]
    got, seconds = {}, {}
    for part in ("train", "test"):  # the CSV through mpinn's converter, to HDF5 (X, y)
        mpinn("data", "convert", f"{paths[part]}.csv", "--label-column", "target", "--out",
              f"{paths[part]}-csv.h5", "--overwrite")
    for fmt, suffix, y_key in (("csv", "-csv.h5", "y"), ("parquet", ".parquet", "target")):
        got[fmt], seconds[fmt] = run_mpinn(f"{paths['train']}{suffix}",
                                           f"{paths['test']}{suffix}", y_key, kind, names,
                                           folder, ranks, seed)
    got["sklearn"], seconds["sklearn"] = run_sklearn(x, y, kind, seed)
    return got, seconds, names, x_all.shape


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--splits", type=int, default=10, help="train/test splits (seeds 0..N-1)")
    parser.add_argument("--sets", default=",".join(SETS), help="data sets, comma-separated")
    parser.add_argument("--out", help="folder for the files and runs (default: a temporary one)")
    args = parser.parse_args()
    folder = Path(args.out or tempfile.mkdtemp(prefix="mpinn-tabular-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"Test-set metrics, mean ± standard deviation over {args.splits} splits (random_state "
          f"0..{args.splits - 1}); mpinn on {args.ranks} ranks:\n")
    print("| data set | rows x features | metric | scikit-learn MLP | mpinn from CSV | "
          "mpinn from Parquet | mpinn − scikit-learn, paired (± s.e.) |")
    print("|---|---|---|---|---|---|---|")
    timing, raw = [], {}
    for name in args.sets.split(","):
        load, kind = SETS[name]
        runs = [one_split(name, load, kind, seed, folder, args.ranks)
                for seed in range(args.splits)]
        names, shape = runs[0][2], runs[0][3]
        for i, metric in enumerate(names):
            cells = []
            for tool in ("sklearn", "csv", "parquet"):
                v = np.array([r[0][tool][metric] for r in runs])
                cells.append(f"{v.mean():.4f} ± {v.std():.4f}")
            diff = np.array([r[0]["parquet"][metric] - r[0]["sklearn"][metric] for r in runs])
            cells.append(f"{diff.mean():+.4f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.4f}"
                         if len(diff) > 1 else f"{diff.mean():+.4f}")
            label = (name, f"{shape[0]} x {shape[1]}") if i == 0 else ("", "")
            print(f"| {label[0]} | {label[1]} | {metric} | " + " | ".join(cells) + " |")
        raw[name] = [r[0] for r in runs]
        timing.append(f"{name}: scikit-learn {np.mean([r[1]['sklearn'] for r in runs]):.1f} s, "
                      f"mpinn {np.mean([r[1]['parquet'] for r in runs]):.1f} s")
    (folder / "results.json").write_text(json.dumps(raw, indent=1))
    print("\nmean seconds to fit (scikit-learn, one process) or to train (mpinn train, including "
          "its start-up): " + "; ".join(timing))


if __name__ == "__main__":
    main()
