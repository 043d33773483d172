"""--metrics (metrics.py): every metric equal to scikit-learn's on the same predictions, computed
from every rank's rows gathered to rank 0: at 1, 2 and 3 ranks on uneven slices and through a
pipeline, in train's validation records, evaluate's JSON and a sweep's results; --monitor on a
metric; one clear error for a metric that cannot be computed."""
import csv
import json

import h5py
import numpy as np
import pytest

from helpers import ok, run_many, run_mpinn, write_classification, write_regression
from mpinn.metrics import CLASSIFICATION, REGRESSION, compute

M = pytest.importorskip("sklearn.metrics")
label_binarize = pytest.importorskip("sklearn.preprocessing").label_binarize


def sklearn_classification(y, prob):
    k = prob.shape[1]
    labels, pred = list(range(k)), prob.argmax(1)
    out = {"accuracy": M.accuracy_score(y, pred), "log_loss": M.log_loss(y, prob, labels=labels),
           "confusion_matrix": M.confusion_matrix(y, pred, labels=labels).tolist()}
    for name, f in (("precision", M.precision_score), ("recall", M.recall_score),
                    ("f1", M.f1_score)):
        out[name] = {"macro": f(y, pred, labels=labels, average="macro", zero_division=0),
                     "weighted": f(y, pred, labels=labels, average="weighted", zero_division=0),
                     "per_class": f(y, pred, labels=labels, average=None,
                                    zero_division=0).tolist()}
    if k == 2:
        out["roc_auc"] = M.roc_auc_score(y, prob[:, 1])
        out["average_precision"] = M.average_precision_score(y, prob[:, 1])
    else:
        out["roc_auc"] = M.roc_auc_score(y, prob, multi_class="ovr", labels=labels)
        out["average_precision"] = M.average_precision_score(label_binarize(y, classes=labels),
                                                             prob, average="macro")
    return out


def sklearn_regression(y, out):
    return {"mae": {"mean": M.mean_absolute_error(y, out),
                    "per_output": M.mean_absolute_error(y, out, multioutput="raw_values")},
            "rmse": {"mean": M.root_mean_squared_error(y, out),
                     "per_output": M.root_mean_squared_error(y, out, multioutput="raw_values")},
            "r2": {"mean": M.r2_score(y, out),
                   "per_output": M.r2_score(y, out, multioutput="raw_values")}}


def assert_same(got, expect, rtol=1e-12):
    assert set(got) == set(expect)
    for name, value in expect.items():
        if isinstance(value, dict):
            for part, v in value.items():
                np.testing.assert_allclose(got[name][part], v, rtol=rtol, atol=rtol,
                                           err_msg=f"{name} {part}")
        elif name == "confusion_matrix":
            assert got[name] == value
        else:
            assert got[name] == pytest.approx(value, rel=rtol, abs=rtol), name


@pytest.mark.parametrize("k", [2, 3, 5])
def test_classification_metrics_are_sklearns(k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 203)
    logits = np.round(rng.normal(size=(203, k)), 1)  # rounded: tied scores, as real outputs have
    logits[np.arange(203), y] += 1.0
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert_same(compute(CLASSIFICATION, y, prob, True), sklearn_classification(y, prob))


def test_regression_metrics_are_sklearns_with_a_constant_target():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(60, 3))
    y[:, 2] = 1.5  # r2 of an output that never varies: scikit-learn's force_finite rule
    out = y + rng.normal(size=y.shape) * 0.3
    assert_same(compute(REGRESSION, y, out, False), sklearn_regression(y, out))
    out[:, 2] = 1.5
    assert compute(["r2"], y, out, False)["r2"]["per_output"][2] == 1.0


# -- over ranks ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """A 3-class classifier and a 2-output regression (targets scaled) of 203 rows, and 1-rank
    predictions of each (the rows scikit-learn scores)."""
    tmp = tmp_path_factory.mktemp("metrics")
    cls = write_classification(tmp / "cls.h5", 203, 6, 3, seed=4)
    reg = write_regression(tmp / "reg.h5", 203, 5, 2, seed=4)
    jobs = {"cls": (2, ["train", "--data", cls, "--hidden", "8", "--epochs", 2,
                        "--run-dir", tmp / "cls"]),
            "reg": (2, ["train", "--data", reg, "--loss", "mse", "--hidden", "8", "--epochs", 2,
                        "--scale-targets", "standard", "--run-dir", tmp / "reg"])}
    runs = run_many(jobs, tmp / "jobs")
    for key in jobs:
        ok(runs[key])
    for key, path in (("cls", cls), ("reg", reg)):
        ok(run_mpinn(1, "predict", "--checkpoint", tmp / key / "checkpoint.h5", "--data", path,
                     "--out", tmp / f"{key}-pred.h5", "--batch-size", 17))
    with h5py.File(cls, "r") as f, h5py.File(tmp / "cls-pred.h5", "r") as p:
        cls_expect = sklearn_classification(f["y"][...], p["prob"][...].astype(np.float64))
    with h5py.File(reg, "r") as f, h5py.File(tmp / "reg-pred.h5", "r") as p:
        reg_expect = sklearn_regression(f["y"][...].astype(np.float64),
                                        p["output"][...].astype(np.float64))
    return {"cls": (cls, tmp / "cls" / "checkpoint.h5", cls_expect),
            "reg": (reg, tmp / "reg" / "checkpoint.h5", reg_expect)}


@pytest.mark.parametrize("layout", [(1, []), (2, []), (3, []), (2, ["--pipeline-stages", 2])],
                         ids=["1 rank", "2 ranks", "3 ranks", "2 stages"])
@pytest.mark.parametrize("task", ["cls", "reg"])
def test_evaluate_reports_sklearns_metrics_at_any_layout(networks, task, layout):
    """evaluate's rows are split unevenly (203 rows, forward passes of 17): float32 outputs of
    other chunkings differ in the last bits, hence rtol 1e-5; the labels are the same rows."""
    data, ckpt, expect = networks[task]
    ranks, extra = layout
    names = CLASSIFICATION if task == "cls" else REGRESSION
    r = ok(run_mpinn(ranks, "evaluate", "--checkpoint", ckpt, "--data", data, "--json",
                     "--batch-size", 17, "--metrics", ",".join(names), *extra))
    result = json.loads(r.stdout)
    assert_same({k: result[k] for k in names}, expect, rtol=1e-5)


def test_train_reports_metrics_each_epoch_and_monitor_follows_one(tmp_path):
    data = write_classification(tmp_path / "d.h5", 300, 6, 3, seed=1)
    val = write_classification(tmp_path / "v.h5", 101, 6, 3, seed=1)
    r = ok(run_mpinn(3, "train", "--data", data, "--val-data", val, "--hidden", "8", "--epochs",
                     4, "--metrics", "f1,roc_auc,confusion_matrix", "--monitor", "val_f1",
                     "--early-stop", 10, "--run-dir", tmp_path / "r"))
    records = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")
               if '"kind": "epoch"' in line]
    assert len(records) == 4 and "f1 " in r.stdout and "roc_auc " in r.stdout
    for rec in records:
        assert rec["val_f1"] == rec["val_metrics"]["f1"]["macro"]
        assert rec["val_roc_auc"] == rec["val_metrics"]["roc_auc"]
        assert np.array(rec["val_metrics"]["confusion_matrix"]).sum() == 101
    from mpinn import checkpoint
    best = checkpoint.load(str(tmp_path / "r" / "best.h5"))
    assert best.epoch == int(np.argmax([rec["val_f1"] for rec in records])) + 1


def test_a_sweep_reports_the_metrics(tmp_path):
    data = write_classification(tmp_path / "d.h5", 200, 6, 3, seed=1)
    (tmp_path / "grid.toml").write_text('[grid]\nhidden = ["8", "4"]\n')
    ok(run_mpinn(2, "sweep", "--grid", tmp_path / "grid.toml", "--out", tmp_path / "s",
                 "--data", data, "--val-data", data, "--epochs", 1, "--metrics", "f1"))
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert len(rows) == 2 and all(0 <= float(row["val_f1"]) <= 1 for row in rows)


UNFIT_METRICS = [
    (["--metrics", "auc"], "--metrics: unknown metric 'auc'"),
    (["--metrics", "r2"], "--metrics r2 does not fit a network of class labels"),
    (["--metrics", "roc_auc", "--val-data", "{one}"], "--metrics roc_auc needs every class"),
    (["--monitor", "val_f1"], "--monitor val_f1 needs --metrics f1"),
]


@pytest.fixture(scope="module")
def unfit_metric_runs(tmp_path_factory):
    """Every case of UNFIT_METRICS, in one 2-rank launch (helpers.run_many)."""
    tmp = tmp_path_factory.mktemp("unfit")
    data = write_classification(tmp / "d.h5", 100, 6, 3, seed=1)
    with h5py.File(tmp / "one.h5", "w") as f:  # validation rows of one class only
        f["X"], f["y"] = np.zeros((20, 6), np.float32), np.zeros(20, np.int64)
    jobs = {}
    for i, (args, _) in enumerate(UNFIT_METRICS):
        args = [a.format(one=tmp / "one.h5") for a in args]
        if "--val-data" not in args:
            args += ["--val-data", data]
        jobs[i] = (2, ["train", "--data", data, *args, "--run-dir", tmp / f"r{i}"])
    return run_many(jobs, tmp / "many")


@pytest.mark.parametrize("case", range(len(UNFIT_METRICS)), ids=[m for _, m in UNFIT_METRICS])
def test_a_metric_that_cannot_be_computed_is_one_clear_error(unfit_metric_runs, case):
    r, message = unfit_metric_runs[case], UNFIT_METRICS[case][1]
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("mpinn: error")]
    assert len(lines) == 1 and message in lines[0], r.stderr
