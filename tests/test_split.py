"""--val-fraction (data/split.py): the validation rows are drawn from the training file with the
run's seed, the same rows at any rank count; training on the split is training on two files holding
those rows; streamed reads the same rows; input scaling is fitted on the training rows only; resume
keeps the split and evaluate finds it in the checkpoint; bad fractions are one clear error."""
import json

import h5py
import numpy as np
import pytest

from helpers import ok, run_many, run_mpinn
from mpinn import checkpoint
from mpinn.data import Columns, RowSource, block_selections, plan_selections, read_rows, split_rows
from mpinn.errors import UsageError
from mpinn.plan import BatchPlan, even_part

N, F = 203, 5  # no rank count here divides 203, nor the 152 training rows
FRACTION, SEED = 0.25, 5


def table(n=N):
    rng = np.random.default_rng(11)
    x = (rng.normal(size=(n, F)) * [1, 10, 100, 0.1, 3] + [0, 50, -7, 2, 0]).astype(np.float32)
    y = (x[:, 0] + x[:, 1] / 10 > 0.5).astype(np.int64) + (x[:, 2] > 0)
    return x, y


# -- the split and the reads, without MPI ---------------------------------------------------------
def test_split_is_seeded_disjoint_complete_and_in_file_order():
    train, val = split_rows(N, FRACTION, SEED)
    assert len(val) == round(FRACTION * N) and len(train) == N - len(val)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(N))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    again_train, again_val = split_rows(N, FRACTION, SEED)
    assert np.array_equal(again_val, val) and np.array_equal(again_train, train)
    assert not np.array_equal(split_rows(N, FRACTION, SEED + 1)[1], val)


@pytest.mark.parametrize("fraction,ranks", [(0.001, 1), (0.99, 3)])
def test_a_split_that_leaves_a_part_empty_is_refused(fraction, ranks):
    with pytest.raises(UsageError, match="--val-fraction"):
        split_rows(N, fraction, SEED, ranks)


@pytest.mark.parametrize("rank,size,batch", [(0, 1, 16), (1, 3, 16), (2, 3, 7), (3, 4, 64)])
def test_reads_of_a_split_are_the_files_rows_at_those_positions(tmp_path, rank, size, batch):
    x, y = table()
    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=x, chunks=(16, F))
        f["y"] = y
    train, val = split_rows(N, FRACTION, SEED)
    cols = Columns("X", "y", rows=train)
    plan = BatchPlan(len(train), batch, rank, size)
    got_x, got_y = read_rows(str(path), cols, plan_selections(plan), None)
    mine = train[plan.owned_rows()]
    np.testing.assert_array_equal(got_x, x[mine])
    np.testing.assert_array_equal(got_y, y[mine])
    vx, vy = read_rows(str(path), Columns("X", "y", rows=val),
                       block_selections(len(val), rank, size), None)
    off, count = even_part(len(val), size, rank)
    np.testing.assert_array_equal(vx, x[val[off:off + count]])
    np.testing.assert_array_equal(vy, y[val[off:off + count]])
    source = RowSource(str(path), "X", train)
    try:
        order = np.random.default_rng(rank).permutation(len(train))[:40]
        np.testing.assert_array_equal(source.read(order), x[train[order]])
    finally:
        source.close()


# -- training on a split ---------------------------------------------------------------------------
def train_args(data, run_dir, *extra, epochs=3):
    return ["train", "--data", data, "--epochs", epochs, "--hidden", 8, "--batch-size", 16,
            "--shuffle", "global", "--seed", SEED, "--scale-inputs", "standard",
            "--run-dir", run_dir, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("split")
    x, y = table()
    whole = str(tmp / "whole.h5")
    with h5py.File(whole, "w") as f:
        f["X"], f["y"] = x, y
    train, val = split_rows(N, FRACTION, SEED)
    for name, rows in (("train", train), ("val", val)):
        with h5py.File(tmp / f"{name}.h5", "w") as f:
            f["X"], f["y"] = x[rows], y[rows]
    split = ["--val-fraction", FRACTION]
    jobs = {
        "split-1": (1, train_args(whole, tmp / "split-1", *split)),
        "files-1": (1, train_args(tmp / "train.h5", tmp / "files-1", "--val-data",
                                  tmp / "val.h5")),
        "split-3": (3, train_args(whole, tmp / "split-3", *split)),
        "streamed-3": (3, train_args(whole, tmp / "streamed-3", *split, "--memory-budget",
                                     0.0006)),
        "split-2": (2, train_args(whole, tmp / "split-2", *split)),
        "first-2": (2, train_args(whole, tmp / "resumed-2", *split, epochs=2)),
    }
    out = run_many(jobs, tmp)
    resume = {"resume-2": (2, train_args(whole, tmp / "resumed-2", "--resume"))}
    out.update(run_many(resume, tmp / "again"))  # after first-2 has ended
    out["evaluate-3"] = run_mpinn(3, "evaluate", "--checkpoint", tmp / "split-3" / "checkpoint.h5",
                                  "--json")
    for r in out.values():
        ok(r)
    return tmp, out, train, val


def params(tmp, name):
    return checkpoint.load(str(tmp / name / "checkpoint.h5")).params


def val_losses(tmp, name):
    return [r["val_loss"] for r in map(json.loads, open(tmp / name / "metrics.jsonl"))
            if r.get("kind") == "epoch"]


def test_a_split_trains_as_two_files_of_its_rows(runs):
    tmp, out, train, val = runs
    np.testing.assert_array_equal(params(tmp, "split-1"), params(tmp, "files-1"))
    assert val_losses(tmp, "split-1") == val_losses(tmp, "files-1")
    assert f"validation on {len(val)} of the {N} rows" in out["split-1"].stdout


def test_a_split_is_the_same_at_any_rank_count_and_streamed(runs):
    tmp, _, _, _ = runs
    one = params(tmp, "split-1")
    for name in ("split-2", "split-3"):  # the global shuffle: sums in another order only
        np.testing.assert_allclose(params(tmp, name), one, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(params(tmp, "streamed-3"), params(tmp, "split-3"))
    np.testing.assert_allclose(val_losses(tmp, "split-3"), val_losses(tmp, "split-1"), rtol=1e-5)


def test_scaling_is_fitted_on_the_training_rows_only(runs):
    tmp, _, train, _ = runs
    x = table()[0].astype(np.float64)
    for name in ("split-1", "split-3", "streamed-3"):
        scale = checkpoint.load(str(tmp / name / "checkpoint.h5")).scaling.inputs
        np.testing.assert_allclose(scale.offset, x[train].mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(scale.scale, x[train].std(0), rtol=1e-6)
        assert not np.allclose(scale.offset, x.mean(0), rtol=1e-6, atol=1e-9)


def test_resume_keeps_the_split_and_evaluate_finds_it(runs):
    tmp, out, _, val = runs
    np.testing.assert_array_equal(params(tmp, "resumed-2"), params(tmp, "split-2"))
    assert val_losses(tmp, "resumed-2") == val_losses(tmp, "split-2")
    result = json.loads(out["evaluate-3"].stdout)
    assert result["part"] == "validation" and result["samples"] == len(val)
    assert result["loss"] == pytest.approx(val_losses(tmp, "split-3")[-1], rel=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    (["--val-fraction", "0.2", "--val-data", "x.h5"], "give one of them"),
    (["--val-fraction", "0.001"], "leaves 0 validation"),
])
def test_bad_fractions_are_one_clear_error(runs, extra, message):
    tmp = runs[0]
    r = run_mpinn(2, "train", "--data", tmp / "whole.h5", "--run-dir", tmp / "bad", *extra)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not any((tmp / "bad").glob("*.h5")) and not (tmp / "bad" / "metrics.jsonl").exists()
