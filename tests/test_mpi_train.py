"""Training over real MPI ranks (mpiexec subprocesses with timeouts)."""
import json

import h5py
import numpy as np
import pytest

from helpers import ok, run_many, run_mpinn, write_classification, write_regression
from mpinn import checkpoint
from mpinn.plan import BatchPlan
from reference import ReferenceOptimizer, loss_and_grads, unflatten

# 203 rows: a multiple of neither the global batch (24) nor the number of ranks (2, 3, 4); the last
# global batch has 11 rows, so on 4 ranks the parts of it are 3, 3, 3, 2.
N, F, K, BATCH, EPOCHS = 203, 6, 4, 24, 3
COMMON = ["--hidden", "16,8", "--activation", "tanh", "--optimizer", "momentum", "--lr", "0.05",
          "--batch-size", BATCH, "--epochs", EPOCHS, "--no-shuffle", "--check-every", 1,
          "--log-every", 5]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_classification(tmp_path_factory.mktemp("d") / "train.h5", N, F, K, seed=3)


GLOBAL_SHUFFLE = [a for a in COMMON if a != "--no-shuffle"] + ["--shuffle", "global"]
VARIANTS = {"file order": COMMON, "overlapped": [*COMMON, "--overlap-mb", "0.001"],
            "global shuffle": GLOBAL_SHUFFLE}
RUNS = [("file order", r) for r in (1, 2, 3, 4)] + [("overlapped", r) for r in (2, 3)] + [
    ("global shuffle", r) for r in (1, 2, 4)]


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """(variant, ranks) -> the run folder of that training of the data set; the trainings of one
    rank count run in one launch (helpers.run_many)."""
    root = tmp_path_factory.mktemp("runs")
    jobs = {(variant, ranks): (ranks, ["train", "--data", dataset, *VARIANTS[variant],
                                       "--run-dir", root / f"{variant}-{ranks}"])
            for variant, ranks in RUNS}
    done = run_many(jobs, root)
    return {key: (ok(done[key]), argv[-1])[1] for key, (_, argv) in jobs.items()}


def final(run_dir):
    return checkpoint.load(str(run_dir / "checkpoint.h5"))


@pytest.fixture(scope="module")
def trained(runs):
    """Final parameters of the same run on 1, 2, 3 and 4 ranks."""
    return {ranks: final(runs["file order", ranks]) for ranks in (1, 2, 3, 4)}


def test_same_parameters_on_1_2_3_4_ranks(trained):
    base = trained[1]
    steps = EPOCHS * -(-N // BATCH)
    for ranks, ckpt in trained.items():
        assert ckpt.global_step == steps and ckpt.epoch == EPOCHS
        assert ckpt.config["ranks"] == ranks
        np.testing.assert_allclose(ckpt.params, base.params, rtol=1e-4, atol=1e-6,
                                   err_msg=f"{ranks} ranks differ from 1 rank")


def test_one_rank_matches_naive_numpy_training(dataset, trained):
    """The whole loop (batches in file order, mean loss, momentum) against the reference in
    float64."""
    with h5py.File(dataset, "r") as f:
        x, y = f["X"][...].astype(np.float64), f["y"][...]
    from mpinn.model import Architecture, init_params
    arch = trained[1].arch
    w = init_params(Architecture(arch.sizes, "tanh"), 0).astype(np.float64)
    opt = ReferenceOptimizer("momentum", 0.05)
    plan = BatchPlan(N, BATCH)
    for _ in range(EPOCHS):
        for k in range(plan.steps_per_epoch):
            s = slice(k * BATCH, min((k + 1) * BATCH, N))
            _, grads = loss_and_grads(unflatten(w, arch.sizes), x[s], y[s], "tanh", "cross_entropy")
            w = opt.step(w, np.concatenate([np.concatenate([g.ravel(), b]) for g, b in grads]))
    np.testing.assert_allclose(
        trained[1].params, w, rtol=1e-5, atol=1e-6
    )  # float32 rounding over 27 steps


def test_replica_check_catches_diverged_ranks(dataset, tmp_path):
    """The periodic check is real: a rank whose parameters drift stops the job with a clear
    error."""
    r = run_mpinn(2, "train", "--data", dataset, "--run-dir", tmp_path, *COMMON,
                  env={"MPINN_FAULT": "perturb:rank=1:step=4"}, timeout=60)
    assert r.returncode == 1
    assert "ranks hold different parameters after step 4" in r.stderr


def test_resume_continues_exactly(dataset, tmp_path):
    """2 epochs straight == 1 epoch then --resume; and == a run stopped mid-epoch by --steps and
    resumed. Shuffling on, so the resumed run must restore the data order too."""
    args = ["--data", dataset, "--hidden", "12", "--batch-size", 32, "--log-every", 50]
    ok(run_mpinn(2, "train", *args, "--epochs", 2, "--run-dir", tmp_path / "straight"))
    ok(run_mpinn(2, "train", *args, "--epochs", 1, "--run-dir", tmp_path / "split"))
    r = ok(run_mpinn(2, "train", *args, "--epochs", 2, "--run-dir", tmp_path / "split", "--resume"))
    ok(run_mpinn(2, "train", *args, "--epochs", 2, "--steps", 10, "--run-dir", tmp_path / "mid"))
    ok(run_mpinn(2, "train", *args, "--epochs", 2, "--run-dir", tmp_path / "mid", "--resume"))
    straight = checkpoint.load(str(tmp_path / "straight" / "checkpoint.h5"))
    for name in ("split", "mid"):
        resumed = checkpoint.load(str(tmp_path / name / "checkpoint.h5"))
        assert resumed.global_step == straight.global_step == 2 * 7
        np.testing.assert_array_equal(resumed.params, straight.params, err_msg=name)
        for a, b in zip(resumed.optimizer_state, straight.optimizer_state):
            np.testing.assert_array_equal(a, b)
    lines = [json.loads(l) for l in open(tmp_path / "split" / "metrics.jsonl")]
    assert [l["epoch"] for l in lines if l["kind"] == "epoch"] == [1, 2]
    assert "epoch 2/2" in r.stdout and "epoch 1/2" not in r.stdout


def test_exception_on_one_rank_ends_the_job(dataset, tmp_path):
    r = run_mpinn(3, "train", "--data", dataset, "--run-dir", tmp_path, *COMMON,
                  env={"MPINN_FAULT": "raise:rank=1:step=3"}, timeout=60)  # a hang fails here
    assert r.returncode == 1
    assert (
        r.stderr.count("mpinn: error on rank 1 of 3: RuntimeError: injected fault at step, step 3")
        == 1
    )


def test_only_rank_0_prints(dataset, tmp_path):
    r = ok(run_mpinn(3, "train", "--data", dataset, "--run-dir", tmp_path, *COMMON))
    assert r.stdout.count("mpinn train: config") == 1
    assert r.stdout.count("mpinn train: done") == 1
    steps = [l for l in r.stdout.splitlines() if l.startswith("epoch ") and " step " in l]
    assert len(steps) == len(set(steps))
    metrics = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert metrics[-2]["kind"] == "epoch" and metrics[-2]["step"] == EPOCHS * 9
    assert metrics[-1]["kind"] == "summary" and metrics[-1]["samples"] == EPOCHS * N
    assert f"{EPOCHS * N:,} samples" in r.stdout
    assert all(np.isfinite(m["loss"]) for m in metrics if m["kind"] == "train")


def test_mse_regression_learns(tmp_path):
    data = write_regression(tmp_path / "reg.h5", 300, 5, 2)
    r = ok(run_mpinn(2, "train", "--data", data, "--val-data", data, "--loss", "mse", "--hidden",
                     "32", "--epochs", 40, "--batch-size", 32, "--run-dir", tmp_path / "run",
                     "--log-every", 1000, "--lr", "0.01"))
    val = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    val = [m["val_loss"] for m in val if m["kind"] == "epoch"]
    assert val[-1] < 0.1 * val[0], val
    assert "acc" not in r.stdout.split("validation")[-1]


@pytest.mark.parametrize("ranks", [2, 3])
def test_overlapped_allreduce_gives_the_same_training(trained, runs, ranks):
    """Buckets of about 1 KiB: several Iallreduce per step, started during the backward pass."""
    ckpt = final(runs["overlapped", ranks])
    np.testing.assert_allclose(ckpt.params, trained[1].params, rtol=1e-4, atol=1e-6)
    assert ckpt.global_step == trained[1].global_step


def test_global_shuffle_gives_the_same_training_on_1_2_4_ranks(runs):
    result = {ranks: final(runs["global shuffle", ranks]) for ranks in (1, 2, 4)}
    for ranks in (2, 4):
        np.testing.assert_allclose(result[ranks].params, result[1].params, rtol=1e-4, atol=1e-6)
    # and it is a real shuffle: not the file order
    fixed = final(runs["file order", 1])
    assert not np.allclose(fixed.params, result[1].params, rtol=1e-3)
    summary = [json.loads(l) for l in open(runs["global shuffle", 4] / "metrics.jsonl")]
    assert summary[-1]["global_shuffle_s"] > 0
