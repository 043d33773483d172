"""The user's commands end to end: bundled data, evaluate, predict, XOR, --init, and the error
contract (one line, printed once, exit 2) for bad input seen by all ranks or by one rank only."""
import csv
import json

import h5py
import numpy as np
import pytest

from helpers import DIGITS_TEST, ROOT, ok, rows_of, run_many, run_mpinn, write_classification
from mpinn import checkpoint


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """`make train`'s job: the default train on the bundled digits data, on 2 ranks."""
    run_dir = tmp_path_factory.mktemp("digits")
    r = ok(run_mpinn(2, "train", "--run-dir", run_dir, timeout=300))
    return run_dir, r


def test_bundled_digits_reach_95_percent(digits_run):
    run_dir, r = digits_run
    e = ok(run_mpinn(2, "evaluate", "--checkpoint", run_dir / "checkpoint.h5", "--json"))
    result = json.loads(e.stdout)
    assert result["samples"] == rows_of(DIGITS_TEST) and result["data"].endswith("digits-test.h5")
    assert result["accuracy"] >= 0.95, result


def test_evaluate_is_the_same_on_any_number_of_ranks(digits_run):
    ckpt = digits_run[0] / "checkpoint.h5"
    results = [json.loads(ok(run_mpinn(n, "evaluate", "--checkpoint", ckpt, "--json",
                                       "--batch-size", 50)).stdout) for n in (1, 3, 4)]
    for r in results[1:]:
        assert r["samples"] == results[0]["samples"]
        assert r["accuracy"] == results[0]["accuracy"]
        assert r["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)


def test_predict_writes_h5_and_csv_in_input_order(digits_run, tmp_path):
    ckpt = digits_run[0] / "checkpoint.h5"
    test = ROOT / "data" / "digits-test.h5"
    ok(run_mpinn(1, "predict", "--checkpoint", ckpt, "--data", test, "--out", tmp_path / "p.h5",
                 "--batch-size", 100))
    ok(run_mpinn(2, "predict", "--checkpoint", ckpt, "--data", test, "--out", tmp_path / "p.csv"))
    with h5py.File(test, "r") as f:
        y = f["y"][...]
    with h5py.File(tmp_path / "p.h5", "r") as f:
        pred, prob = f["pred"][...], f["prob"][...]
    n = rows_of(DIGITS_TEST)
    assert pred.shape == (n,) and prob.shape == (n, 10)
    np.testing.assert_allclose(prob.sum(1), 1, rtol=1e-5)
    np.testing.assert_array_equal(pred, prob.argmax(1))
    accuracy = json.loads(ok(run_mpinn(1, "evaluate", "--checkpoint", ckpt, "--json")).stdout)
    assert (pred == y).mean() == pytest.approx(accuracy["accuracy"])
    rows = list(csv.reader(open(tmp_path / "p.csv")))
    assert rows[0] == ["pred"] + [f"p{j}" for j in range(10)] and len(rows) == 361
    np.testing.assert_array_equal([int(r[0]) for r in rows[1:]], pred)
    np.testing.assert_allclose(np.array(rows[1:], float)[:, 1:], prob, rtol=1e-4, atol=1e-6)


def test_xor_network_learns_xor(tmp_path):
    """3000 full-batch steps: the four rows repeated 100 times in file order, batches of 4, so
    each batch is the whole XOR table and an epoch is 100 steps (not 3000 one-step epochs, each
    ending with a checkpoint)."""
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    t = np.array([[0], [1], [1], [0]], np.float32)
    with h5py.File(tmp_path / "xor.h5", "w") as f:
        f["X"], f["y"] = x, t
    with h5py.File(tmp_path / "xor-100.h5", "w") as f:
        f["X"], f["y"] = np.tile(x, (100, 1)), np.tile(t, (100, 1))
    ok(run_mpinn(1, "train", "--data", tmp_path / "xor-100.h5", "--hidden", "4", "--activation",
                 "sigmoid", "--loss", "mse", "--output-activation", "sigmoid", "--optimizer",
                 "momentum", "--lr", "0.5", "--batch-size", 4, "--epochs", 30, "--no-shuffle",
                 "--log-every", 1000, "--run-dir", tmp_path / "run"))
    ok(run_mpinn(1, "predict", "--checkpoint", tmp_path / "run" / "checkpoint.h5", "--data",
                 tmp_path / "xor.h5", "--out", tmp_path / "out.h5"))
    with h5py.File(tmp_path / "out.h5", "r") as f:
        out = f["output"][...]
    assert out.shape == (4, 1)
    np.testing.assert_array_equal(out.round(), t)
    assert np.abs(out - t).max() < 0.2, out


def test_init_takes_weights_and_architecture(digits_run, tmp_path):
    ckpt = digits_run[0] / "checkpoint.h5"
    ok(run_mpinn(2, "train", "--init", ckpt, "--epochs", 1, "--run-dir", tmp_path / "a"))
    assert checkpoint.load(str(tmp_path / "a" / "checkpoint.h5")).arch.sizes == (64, 128, 64, 10)
    r = run_mpinn(2, "train", "--init", ckpt, "--hidden", "32", "--run-dir", tmp_path / "b")
    assert r.returncode == 2
    assert "--hidden (32,) conflicts with the checkpoint's (128, 64)" in r.stderr


def errors(run):
    return [l for l in run.stderr.splitlines() if l.startswith("mpinn: error")]


@pytest.mark.parametrize("ranks", [1, 3])
def test_missing_data_file_is_one_line_exit_2(tmp_path, ranks):
    r = run_mpinn(ranks, "train", "--data", tmp_path / "nope.h5", "--run-dir", tmp_path / "r")
    assert r.returncode == 2
    assert len(errors(r)) == 1 and "data file not found" in errors(r)[0]
    assert "Traceback" not in r.stderr


def test_bad_option_is_printed_once(tmp_path):
    r = run_mpinn(3, "train", "--lr", "-1")
    assert r.returncode == 2 and errors(r) == ["mpinn: error: --lr must be positive, got -1.0"]


def test_error_seen_by_one_rank_only_ends_all_ranks_once(tmp_path):
    """A validation label out of range lies in the last rank's block only."""
    train = write_classification(tmp_path / "t.h5", 60, 4, 3)
    rng = np.random.default_rng(0)
    y = np.zeros(30, np.int64)
    y[-1] = 7
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["X"], f["y"] = rng.normal(size=(30, 4)).astype(np.float32), y
    r = run_mpinn(3, "train", "--data", train, "--val-data", tmp_path / "v.h5", "--run-dir",
                  tmp_path / "r", timeout=60)
    assert r.returncode == 2
    assert len(errors(r)) == 1
    assert "rank 2 of 3" in errors(r)[0] and "class label 7 is out of range" in errors(r)[0]


RUN_SETTINGS = [
    (["--batch-size", 2], "--batch-size 2 is smaller than the number of ranks (3)"),
    (["--resume"], "--resume: no checkpoint at"),
    (["--data", "TINY"], "has 2 rows, fewer than the 3 ranks"),
]


@pytest.fixture(scope="module")
def run_settings_runs(tmp_path_factory):
    """Every case of RUN_SETTINGS, in one 3-rank launch (helpers.run_many)."""
    tmp = tmp_path_factory.mktemp("settings")
    train = write_classification(tmp / "t.h5", 60, 4, 3)
    tiny = write_classification(tmp / "tiny.h5", 2, 4, 3)
    jobs = {i: (3, ["train", "--data", train, "--run-dir", tmp / f"r{i}",
                    *[tiny if a == "TINY" else a for a in args]])
            for i, (args, _) in enumerate(RUN_SETTINGS)}
    return run_many(jobs, tmp / "many")


@pytest.mark.parametrize("case", range(len(RUN_SETTINGS)), ids=[m for _, m in RUN_SETTINGS])
def test_run_settings_errors(run_settings_runs, case):
    r, message = run_settings_runs[case], RUN_SETTINGS[case][1]
    assert r.returncode == 2 and len(errors(r)) == 1 and message in errors(r)[0], r.stderr


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    r = run_mpinn(2, "train", "--run-dir", tmp_path / "f")
    assert r.returncode == 2 and "exists and is not a directory" in errors(r)[0]


def test_help_only_from_rank_0():
    r = ok(run_mpinn(3, "train", "--help"))
    assert r.stdout.count("usage: mpinn train") == 1 and "--batch-size" in r.stdout


def test_rank_with_an_empty_part_of_the_last_batch(tmp_path):
    """10 rows, batch 4, 3 ranks: rank 2 owns no row of the last batch and still takes part."""
    train = write_classification(tmp_path / "t.h5", 10, 4, 3)
    r = ok(run_mpinn(3, "train", "--data", train, "--batch-size", 4, "--epochs", 2, "--hidden", "5",
                     "--check-every", 1, "--run-dir", tmp_path / "r"))
    assert checkpoint.load(str(tmp_path / "r" / "checkpoint.h5")).global_step == 6
    assert "20 samples" in r.stdout


def test_integer_regression_targets_are_questioned_once(tmp_path):
    """scikit-learn's diabetes targets (25..346) written as int64 train as a 347-class classifier:
    train says so, once; the bundled digits (10 classes, 1437 rows) are not questioned."""
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "diabetes.h5", "w") as f:
        f["X"] = rng.normal(size=(442, 10)).astype(np.float32)
        f["y"] = np.concatenate([[25, 346], rng.integers(25, 347, 440)]).astype(np.int64)
    r = ok(run_mpinn(2, "train", "--data", tmp_path / "diabetes.h5", "--epochs", 1, "--hidden",
                     "8", "--run-dir", tmp_path / "r"))
    assert r.stderr.count("347 classes for 442 rows: is y a regression target stored as "
                          "integers? use --loss mse") == 1, r.stderr
    digits = ok(run_mpinn(2, "train", "--epochs", 1, "--hidden", "8", "--run-dir", tmp_path / "d"))
    assert "regression target" not in digits.stderr


@pytest.mark.parametrize("ranks", [2, 3])
def test_predict_on_every_rank_writes_the_one_rank_file(digits_run, tmp_path, ranks):
    """Each rank predicts its rows of every round (batch 17: 360 rows are 22 rounds at 1 rank,
    uneven ones at 2 and 3), rank 0 writes them in input order: the file of 1 rank, H5 and CSV."""
    ckpt = digits_run[0] / "checkpoint.h5"
    for out in ("one.h5", "one.csv"):
        ok(run_mpinn(1, "predict", "--checkpoint", ckpt, "--data", DIGITS_TEST, "--out",
                     tmp_path / out, "--batch-size", 17))
    for out in ("many.h5", "many.csv"):
        r = ok(run_mpinn(ranks, "predict", "--checkpoint", ckpt, "--data", DIGITS_TEST, "--out",
                         tmp_path / out, "--batch-size", 17))
        assert "wait" not in r.stdout and r.stdout.count("wrote 360 predictions") == 1
    with h5py.File(tmp_path / "one.h5", "r") as a, h5py.File(tmp_path / "many.h5", "r") as b:
        np.testing.assert_array_equal(a["pred"][...], b["pred"][...])
        np.testing.assert_array_equal(a["prob"][...], b["prob"][...])
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "many.csv").read_text()
