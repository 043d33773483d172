"""--class-weight (cross-entropy) and --weight-key (a row's own weight, any loss): each row's
loss weighted by its class's weight times its own, the mean taken over the weights, as torch's
CrossEntropyLoss(weight=...) and a weighted mean of reduction="none" losses (against PyTorch step
by step at 1 and 3 ranks and on 3 pipeline stages: test_torch_reference.py). Here: 'balanced' is
scikit-learn's compute_class_weight over the training rows, summed across ranks; the per-step
weight sums (one Allreduce an epoch) make the run the same at any rank count, streamed or not,
resumed or not; the checkpoint keeps the weights for resume and evaluate; validation and evaluate
report the weighted mean loss; bad weights are one clear error each."""
import json

import h5py
import numpy as np
import pytest

from helpers import ok, run_many, run_mpinn
from mpinn import checkpoint

utils = pytest.importorskip("sklearn.utils")
N, F = 211, 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("weights")
    rng = np.random.default_rng(8)
    x = rng.normal(size=(N, F)).astype(np.float32)
    y = np.where(x[:, 0] > 1.1, 2, np.where(x[:, 1] > 0.2, 1, 0))  # 3 classes, one rare
    data = str(tmp / "d.h5")
    with h5py.File(data, "w") as f:
        f["X"], f["y"] = x, y
    common = ["--data", data, "--val-data", data, "--class-weight", "balanced", "--hidden", 8,
              "--epochs", 3, "--batch-size", 24, "--shuffle", "global", "--optimizer", "momentum",
              "--lr", "0.1"]
    jobs = {name: (ranks, ["train", *common, *extra, "--run-dir", tmp / name])
            for name, ranks, extra in (("one", 1, []), ("three", 3, []),
                                       ("streamed", 3, ["--memory-budget", 0.0005]),
                                       ("first", 2, ["--steps", 10]))}
    out = run_many(jobs, tmp)
    out.update(run_many({"resumed": (2, ["train", "--resume", "--epochs", 3, "--run-dir",
                                         tmp / "first"])}, tmp / "again"))
    for r in out.values():
        ok(r)
    return tmp, data, x, y, out


def params(tmp, name):
    return checkpoint.load(str(tmp / name / "checkpoint.h5")).params


def test_balanced_weights_are_sklearns_and_kept_in_the_checkpoint(runs):
    tmp, _, _, y, _ = runs
    expect = utils.class_weight.compute_class_weight("balanced", classes=np.arange(3), y=y)
    for name in ("one", "three", "streamed", "first"):  # "first": the resumed run
        got = checkpoint.load(str(tmp / name / "checkpoint.h5")).arch.class_weight
        np.testing.assert_allclose(got, expect, rtol=1e-12)


def test_weighted_training_is_the_same_at_any_rank_count_streamed_and_resumed(runs):
    tmp = runs[0]
    one = params(tmp, "one")
    np.testing.assert_allclose(params(tmp, "three"), one, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(params(tmp, "streamed"), params(tmp, "three"))
    np.testing.assert_allclose(params(tmp, "first"), one, rtol=0, atol=1e-6)  # resumed at 10


def test_validation_and_evaluate_report_the_weighted_mean_loss(runs):
    tmp, data, x, y, _ = runs
    records = [json.loads(line) for line in open(tmp / "one" / "metrics.jsonl")
               if '"kind": "epoch"' in line]
    ok(run_mpinn(1, "predict", "--checkpoint", tmp / "one" / "checkpoint.h5", "--data", data,
                 "--out", tmp / "p.h5"))
    with h5py.File(tmp / "p.h5") as p:
        prob = p["prob"][...].astype(np.float64)
    w = np.array(checkpoint.load(str(tmp / "one" / "checkpoint.h5")).arch.class_weight)[y]
    expect = float((w * -np.log(prob[np.arange(N), y])).sum() / w.sum())
    assert records[-1]["val_loss"] == pytest.approx(expect, rel=1e-5)
    r = ok(run_mpinn(3, "evaluate", "--checkpoint", tmp / "one" / "checkpoint.h5", "--data",
                     data, "--json", "--batch-size", 17))
    assert json.loads(r.stdout)["loss"] == pytest.approx(expect, rel=1e-5)


BAD_CLASS_WEIGHTS = {
    "too few": (["--class-weight", "1,2"], "--class-weight takes one weight per class of a "
                                           "cross_entropy network (3 classes)"),
    "a class that does not exist": (["--class-weight", "1,2,3,4"], "(3 classes)"),
    "negative": (["--class-weight", "1,-2,3"], "none negative"),
    "all zero": (["--class-weight", "0,0,0"], "not all 0"),
    "not numbers": (["--class-weight", "heavy"], "--class-weight takes 'balanced' or one number "
                                                 "per class"),
    "balanced, a class without rows": (["--class-weight", "balanced", "--classes", 4],
                                       "class 3 has no training rows"),
    "not cross-entropy": (["--class-weight", "balanced", "--loss", "mse"],
                          "--class-weight weights the classes of --loss cross_entropy"),
}


@pytest.fixture(scope="module")
def bad_class_weights(runs):
    """Every bad --class-weight at 2 ranks, in one launch (tests/many.py)."""
    tmp, data = runs[0], runs[1]
    return tmp, run_many({case: (2, ["train", "--data", data, *extra, "--run-dir",
                                     tmp / f"bad-{i}"])
                          for i, (case, (extra, _)) in enumerate(BAD_CLASS_WEIGHTS.items())},
                         tmp / "bad-jobs")


@pytest.mark.parametrize("case", list(BAD_CLASS_WEIGHTS))
def test_bad_class_weights_are_one_clear_error(bad_class_weights, case):
    tmp, out = bad_class_weights
    r, message = out[case], BAD_CLASS_WEIGHTS[case][1]
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not any(tmp.glob("bad-*/checkpoint.h5"))


# -- the rows' own weights (--weight-key) ---------------------------------------------------------
@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A regression file whose rows carry weights (a fifth of them 0), trained at 1 and 3 ranks
    with the global shuffle, streamed, and on a validation split of the same file."""
    tmp = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(9)
    x = rng.normal(size=(N, F)).astype(np.float32)
    y = (x @ rng.normal(size=(F, 2)) + rng.normal(0, 0.3, (N, 2))).astype(np.float32)
    w = (rng.uniform(0.2, 4, N) * (rng.uniform(size=N) > 0.2)).astype(np.float32)
    data = str(tmp / "d.h5")
    with h5py.File(data, "w") as f:
        f["X"], f["y"], f["w"] = x, y, w
    common = ["--data", data, "--loss", "mse", "--weight-key", "w", "--val-fraction", 0.2,
              "--hidden", 8, "--epochs", 3, "--batch-size", 16, "--shuffle", "global"]
    jobs = {name: (ranks, ["train", *common, *extra, "--run-dir", tmp / name])
            for name, ranks, extra in (("one", 1, []), ("three", 3, []),
                                       ("streamed", 3, ["--memory-budget", 0.0005]))}
    out = run_many(jobs, tmp)
    for r in out.values():
        ok(r)
    return tmp, data, x, y, w


def test_own_weights_train_the_same_at_any_rank_count_and_streamed(own):
    tmp = own[0]
    np.testing.assert_allclose(params(tmp, "three"), params(tmp, "one"), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(params(tmp, "streamed"), params(tmp, "three"))


def test_validation_on_a_split_weighs_its_rows_and_evaluate_agrees(own):
    tmp, data, x, y, w = own
    from mpinn.data import split_rows
    _, val = split_rows(N, 0.2, 0)
    ok(run_mpinn(1, "predict", "--checkpoint", tmp / "one" / "checkpoint.h5", "--data", data,
                 "--out", tmp / "p.h5"))
    with h5py.File(tmp / "p.h5") as p:
        out = p["output"][...].astype(np.float64)[val]
    err = ((out - y[val]) ** 2).sum(1)
    expect = float((w[val] * err).sum() / (w[val].sum() * 2))
    records = [json.loads(line) for line in open(tmp / "one" / "metrics.jsonl")
               if '"kind": "epoch"' in line]
    assert records[-1]["val_loss"] == pytest.approx(expect, rel=1e-5)
    r = ok(run_mpinn(2, "evaluate", "--checkpoint", tmp / "one" / "checkpoint.h5", "--json"))
    assert json.loads(r.stdout)["loss"] == pytest.approx(expect, rel=1e-5)


BAD_ROW_WEIGHTS = {
    "one short": (np.ones(N - 1), "must hold one number per row of X (211)"),
    "negative": (-np.ones(N), "holds negative weights"),
    "all zero": (np.zeros(N), "every row weight is 0"),
    "NaN": (np.full(N, np.nan), "contains NaN or inf weights"),
    "missing": (None, "no dataset 'w' of row weights"),
}


@pytest.fixture(scope="module")
def bad_row_weights(own):
    """Every bad --weight-key dataset at 2 ranks, in one launch (tests/many.py)."""
    tmp, _, x, y, _ = own
    jobs = {}
    for i, (case, (weights, _)) in enumerate(BAD_ROW_WEIGHTS.items()):
        bad = tmp / f"bad-{i}.h5"
        with h5py.File(bad, "w") as f:
            f["X"], f["y"] = x, y
            if weights is not None:
                f["w"] = weights
        jobs[case] = (2, ["train", "--data", bad, "--loss", "mse", "--weight-key", "w",
                          "--run-dir", tmp / f"bad-run-{i}"])
    return tmp, run_many(jobs, tmp / "bad-jobs")


@pytest.mark.parametrize("case", list(BAD_ROW_WEIGHTS))
def test_bad_row_weights_are_one_clear_error(bad_row_weights, case):
    tmp, out = bad_row_weights
    r, message = out[case], BAD_ROW_WEIGHTS[case][1]
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not any(tmp.glob("bad-run-*/checkpoint.h5"))
