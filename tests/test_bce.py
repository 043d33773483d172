"""--loss bce (a sigmoid per output: binary with one output, multi-label with K) and --pos-weight.
Training against PyTorch's BCEWithLogitsLoss(pos_weight) at 1 and 3 ranks and through a pipeline
is in test_torch_reference.py; here: a binary network's metrics are scikit-learn's on its
probabilities, predict writes 0/1 predictions and probabilities per label (and ONNX the same
probabilities), the checkpoint keeps pos_weight, and bad input is one clear error each."""
import json

import h5py
import numpy as np
import pytest

from helpers import ok, run_many, run_mpinn
from mpinn import checkpoint
from mpinn.metrics import CLASSIFICATION, compute

M = pytest.importorskip("sklearn.metrics")
N, F = 203, 6


def write(path, k, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, F)).astype(np.float32)
    w = rng.normal(size=(F, k))
    y = (x @ w + rng.normal(0, 0.7, (N, k)) > 0.6).astype(np.int64)
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = x, y[:, 0] if k == 1 else y
    return str(path)


def test_binary_metrics_are_sklearns_on_the_probability():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 57).astype(np.float32)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 57), 0, 1)
    got = compute(CLASSIFICATION, y[:, None], p[:, None], False, binary=True)
    pred = (p > 0.5).astype(int)
    assert got["accuracy"] == pytest.approx(M.accuracy_score(y, pred), rel=1e-12)
    assert got["roc_auc"] == pytest.approx(M.roc_auc_score(y, p), rel=1e-12)
    assert got["average_precision"] == pytest.approx(M.average_precision_score(y, p), rel=1e-12)
    assert got["log_loss"] == pytest.approx(M.log_loss(y, p), rel=1e-9)
    assert got["f1"]["per_class"][1] == pytest.approx(M.f1_score(y, pred), rel=1e-12)
    assert got["confusion_matrix"] == M.confusion_matrix(y, pred).tolist()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bce")
    binary, multi = write(tmp / "binary.h5", 1), write(tmp / "multi.h5", 3, seed=1)
    common = ["--loss", "bce", "--hidden", 8, "--epochs", 3, "--batch-size", 32]
    runs = run_many({
        "binary": (2, ["train", "--data", binary, "--val-data", binary, *common,
                       "--pos-weight", 2.5, "--metrics", "roc_auc,f1", "--monitor",
                       "val_roc_auc", "--run-dir", tmp / "binary"]),
        "multi": (2, ["train", "--data", multi, *common, "--pos-weight", "1,2,3",
                      "--run-dir", tmp / "multi"]),
    }, tmp)
    for r in runs.values():
        ok(r)
    return tmp, binary, multi


def test_the_checkpoint_keeps_pos_weight_and_evaluate_reports_sklearns_metrics(trained):
    tmp, binary, _ = trained
    ckpt = checkpoint.load(str(tmp / "binary" / "checkpoint.h5"))
    assert ckpt.arch.loss == "bce" and ckpt.arch.pos_weight == (2.5,)
    assert checkpoint.load(str(tmp / "multi" / "checkpoint.h5")).arch.pos_weight == (1, 2, 3)
    ok(run_mpinn(3, "predict", "--checkpoint", tmp / "binary" / "checkpoint.h5", "--data",
                 binary, "--out", tmp / "p.h5"))
    r = ok(run_mpinn(3, "evaluate", "--checkpoint", tmp / "binary" / "checkpoint.h5", "--data",
                     binary, "--json", "--batch-size", 17, "--metrics",
                     "accuracy,roc_auc,log_loss"))
    result = json.loads(r.stdout)
    with h5py.File(tmp / "p.h5") as p, h5py.File(binary) as f:
        prob, pred, y = p["prob"][:, 0].astype(np.float64), p["pred"][:, 0], f["y"][...]
    assert len(prob) == N and np.array_equal(pred, (prob > 0.5).astype(np.int8))
    assert result["roc_auc"] == pytest.approx(M.roc_auc_score(y, prob), rel=1e-5)
    assert result["accuracy"] == pytest.approx(M.accuracy_score(y, pred), rel=1e-12)
    assert result["log_loss"] == pytest.approx(M.log_loss(y, prob), rel=1e-5)
    records = [json.loads(line) for line in open(tmp / "binary" / "metrics.jsonl")
               if '"kind": "epoch"' in line]
    assert all(0.5 < rec["val_roc_auc"] <= 1 for rec in records)


def test_predict_and_onnx_give_each_labels_probability(trained):
    tmp, _, multi = trained
    ckpt = tmp / "multi" / "checkpoint.h5"
    ok(run_mpinn(2, "predict", "--checkpoint", ckpt, "--data", multi, "--out", tmp / "m.csv"))
    rows = (tmp / "m.csv").read_text().splitlines()
    assert rows[0] == "pred0,pred1,pred2,p0,p1,p2" and len(rows) == N + 1
    ok(run_mpinn(1, "predict", "--checkpoint", ckpt, "--data", multi, "--out", tmp / "m.h5"))
    with h5py.File(tmp / "m.h5") as p:
        prob, pred = p["prob"][...], p["pred"][...]
    assert prob.shape == pred.shape == (N, 3) and np.array_equal(pred, prob > 0.5)
    onnx = pytest.importorskip("onnxruntime")
    ok(run_mpinn(1, "export", "--checkpoint", ckpt, "--out", tmp / "m.onnx"))
    with h5py.File(multi) as f:
        x = f["X"][...]
    got = onnx.InferenceSession(str(tmp / "m.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, prob, rtol=1e-5, atol=1e-6)


BAD = {
    "targets outside [0, 1]": (["--loss", "bce", "--data", "{reg}"], "holds values outside [0, 1]"),
    "pos_weight without bce": (["--pos-weight", "2"],
                               "--pos-weight weights the positive targets of --loss bce"),
    "pos_weight of the wrong length": (["--loss", "bce", "--data", "{multi}", "--pos-weight",
                                        "1,2"], "--pos-weight takes one positive weight or one "
                                                "per output (3)"),
    "negative pos_weight": (["--loss", "bce", "--pos-weight", "-1"],
                            "--pos-weight values must be positive"),
    "an output activation": (["--loss", "bce", "--data", "{binary}", "--output-activation",
                              "sigmoid"], "--output-activation applies to --loss mse only"),
    "metrics of many labels": (["--loss", "bce", "--data", "{multi}", "--val-data", "{multi}",
                                "--metrics", "f1"], "multi-label network (3 bce outputs)"),
}


@pytest.fixture(scope="module")
def bad_runs(trained):
    """Every bad case at 2 ranks, in one launch (tests/many.py)."""
    tmp, binary, multi = trained
    reg = tmp / "reg.h5"
    with h5py.File(reg, "w") as f:
        f["X"], f["y"] = np.zeros((10, F), np.float32), np.linspace(-1, 2, 10, dtype=np.float32)
    jobs = {case: (2, ["train", *[a.format(reg=reg, multi=multi, binary=binary) for a in extra],
                       "--run-dir", tmp / f"bad-{i}"])
            for i, (case, (extra, _)) in enumerate(BAD.items())}
    return tmp, run_many(jobs, tmp / "bad-jobs")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_bce_input_is_one_clear_error(bad_runs, case):
    tmp, out = bad_runs
    r, message = out[case], BAD[case][1]
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not any(tmp.glob("bad-*/checkpoint.h5"))
