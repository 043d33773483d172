"""Training controls beyond the formulas (which test_torch_reference checks against PyTorch):
early stopping keeps best.h5 and stops every rank at the same epoch, a resume in the middle of a
schedule (and of early stopping's patience) continues exactly, and bad values are one clear
error."""

import json

import h5py
import numpy as np
import pytest

from helpers import ok, run_many, run_mpinn, write_classification
from mpinn import checkpoint

COMMON = ["--hidden", "32", "--batch-size", 20, "--no-shuffle", "--log-every", 100,
          "--optimizer", "adam", "--lr", "0.02"]


@pytest.fixture(scope="module")
def rising(tmp_path_factory):
    """Training data, and validation data with the same inputs but other labels: the better the
    network fits the training data, the worse the validation loss."""
    tmp = tmp_path_factory.mktemp("rising")
    train = write_classification(tmp / "train.h5", 200, 8, 3, seed=2)
    with h5py.File(train, "r") as f:
        x, y = f["X"][...], f["y"][...]
    with h5py.File(tmp / "val.h5", "w") as f:
        f["X"], f["y"] = x, (y + 1) % 3
    return train, str(tmp / "val.h5")


def epochs(run_dir):
    return [json.loads(l) for l in open(run_dir / "metrics.jsonl") if '"kind": "epoch"' in l]


@pytest.mark.parametrize("ranks", [1, 2])
def test_early_stopping_keeps_the_best_weights(rising, tmp_path, ranks):
    train, val = rising
    r = ok(run_mpinn(ranks, "train", "--data", train, "--val-data", val, *COMMON, "--epochs", 30,
                     "--early-stop", 3, "--run-dir", tmp_path / "stop"))
    records = epochs(tmp_path / "stop")
    losses = [e["val_loss"] for e in records]
    best = int(np.argmin(losses))
    assert len(records) == best + 1 + 3 < 30  # three epochs without improvement, then stop
    assert "early stopping" in records[-1]["stopped"]
    assert "mpinn train: early stopping: the validation loss has not improved" in r.stdout
    kept = checkpoint.load(str(tmp_path / "stop" / "best.h5"))
    assert kept.epoch == best + 1
    ok(run_mpinn(ranks, "train", "--data", train, "--val-data", val, *COMMON, "--epochs",
                 best + 1, "--run-dir", tmp_path / "short"))
    np.testing.assert_array_equal(kept.params,
                                  checkpoint.load(str(tmp_path / "short" / "checkpoint.h5")).params)


def test_resume_in_the_middle_of_a_schedule_and_of_patience(rising, tmp_path):
    train, val = rising
    args = ["--data", train, "--val-data", val, *COMMON, "--lr-schedule", "cosine",
            "--warmup-steps", 7, "--clip-grad-norm", "1.0", "--early-stop", 3]
    ok(run_mpinn(2, "train", *args, "--epochs", 30, "--run-dir", tmp_path / "straight"))
    # killed in epoch 3 (a --steps cap would change the schedule's length T): resume from epoch 2
    r = run_mpinn(2, "train", *args, "--epochs", 30, "--run-dir", tmp_path / "res",
                  env={"MPINN_FAULT": "kill:rank=1:step=23"}, timeout=60)
    assert r.returncode != 0
    state = checkpoint.load(str(tmp_path / "res" / "checkpoint.h5")).state
    assert set(state) == {"best_val_loss", "bad_epochs"}
    ok(run_mpinn(2, "train", *args, "--epochs", 30, "--resume", "--run-dir", tmp_path / "res"))
    a = checkpoint.load(str(tmp_path / "straight" / "checkpoint.h5"))
    b = checkpoint.load(str(tmp_path / "res" / "checkpoint.h5"))
    assert a.global_step == b.global_step < 30 * 10  # both stopped early, at the same step
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(
        checkpoint.load(str(tmp_path / "straight" / "best.h5")).params,
        checkpoint.load(str(tmp_path / "res" / "best.h5")).params)


BAD_CONTROLS = [
    (["--warmup-steps", 999], "--warmup-steps 999 must be fewer than the run's"),
    (["--early-stop", 2, "--data", "{train}"], "--early-stop needs validation data"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm must not be negative"),
    (["--gamma", "0"], "--gamma must be positive"),
    (["--lr-schedule", "linear"], "argument --lr-schedule: invalid choice: 'linear'"),
    (["--accumulate", 40], "--accumulate 40: each rank's share of a global batch is 32 rows"),
    (["--accumulate", 2, "--pipeline-stages", 2], "--accumulate is for data-parallel mode"),
    (["--accumulate", 0], "--accumulate must be positive"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
]


@pytest.fixture(scope="module")
def bad_control_runs(rising, tmp_path_factory):
    """Every case of BAD_CONTROLS, in one 2-rank launch (helpers.run_many)."""
    root = tmp_path_factory.mktemp("bad")
    jobs = {}
    for i, (args, _) in enumerate(BAD_CONTROLS):
        (root / str(i)).mkdir()
        jobs[i] = (2, ["train", "--run-dir", root / str(i), "--epochs", 2,
                       *[str(a).format(train=rising[0]) for a in args]])
    return run_many(jobs, root / "many")


@pytest.mark.parametrize("case", range(len(BAD_CONTROLS)), ids=[m for _, m in BAD_CONTROLS])
def test_bad_control_values(bad_control_runs, case):
    r, message = bad_control_runs[case], BAD_CONTROLS[case][1]
    lines = [l for l in r.stderr.splitlines() if l.startswith("mpinn: error")]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr


def run_on_a_terminal(args, tmp_path, ranks=0):
    """mpinn train with stdout on a pseudo-terminal (1 process without a launcher, or `ranks`
    under mpiexec, whose own stdout is then the terminal); all it printed."""
    import os
    import pty
    import subprocess
    import sys

    from helpers import mpiexec, mpinn_env
    master, slave = pty.openpty()
    launch = [mpiexec(), "-n", str(ranks)] if ranks else []
    p = subprocess.Popen([*launch, sys.executable, "-m", "mpinn", "train", *map(str, args)],
                         stdout=slave, stderr=subprocess.DEVNULL, env=mpinn_env(), cwd=tmp_path,
                         start_new_session=True)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not chunk:
            break
        out += chunk
    assert p.wait(timeout=120) == 0
    os.close(master)
    return out.decode(errors="replace")


def test_progress_bar_on_a_terminal_lines_in_logs(tmp_path):
    args = ["--run-dir", tmp_path / "r", "--hidden", "256,256", "--batch-size", 4, "--epochs", 2,
            "--log-every", 1000]
    shown = run_on_a_terminal(args, tmp_path)
    assert "%" in shown and "samples/s  ETA 00:" in shown and "\r" in shown  # a live bar
    assert "mpinn train: done" in shown and "validation loss" in shown.split("done")[1]
    plain = ok(run_mpinn(1, "train", *args, "--overwrite"))  # a pipe: lines only
    assert "ETA" not in plain.stdout and "\r" not in plain.stdout
    forced = ok(run_mpinn(2, "train", *args, "--overwrite", "--progress", "bar"))
    assert "ETA" in forced.stdout  # under mpiexec to a pipe (a job log): asked for explicitly
    assert "ETA" not in ok(run_mpinn(2, "train", *args, "--overwrite")).stdout


def test_progress_bar_under_mpiexec_on_a_terminal_without_step_lines_between(tmp_path):
    """Rank 0 writes to a pipe to mpiexec, whose stdout is the person's terminal: the bar shows
    (runtime/launch.watched_on_a_terminal), and the step lines every --log-every steps give way
    to it, but for each epoch's last (its figures stay in metrics.jsonl)."""
    args = ["--run-dir", tmp_path / "r", "--hidden", "256,256", "--batch-size", 8, "--epochs", 2,
            "--log-every", 10]
    shown = run_on_a_terminal(args, tmp_path, ranks=2)
    assert "samples/s  ETA 00:" in shown and "\r" in shown
    steps = [line for line in shown.replace("\r", "\n").splitlines() if " step " in line]
    assert [s.split(" loss")[0].split("\x1b[K")[-1] for s in steps] == [
        "epoch 1/2 step 180", "epoch 2/2 step 360"]
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    assert sum(r["kind"] == "train" for r in records) == 36  # every 10 steps, as without a bar


def test_evaluation_never_drops(rising, tmp_path):
    """The validation loss logged while training with dropout is what `mpinn evaluate` (no
    dropout) finds for the same weights."""
    train, val = rising
    ok(run_mpinn(2, "train", "--data", train, "--val-data", val, *COMMON, "--epochs", 2,
                 "--dropout", "0.5", "--run-dir", tmp_path))
    logged = epochs(tmp_path)[-1]["val_loss"]
    result = json.loads(ok(run_mpinn(2, "evaluate", "--checkpoint", tmp_path / "checkpoint.h5",
                                     "--data", val, "--json")).stdout)
    assert result["loss"] == pytest.approx(logged, rel=1e-6)


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("factor,patience,cooldown,threshold,min_lr", [
    (0.1, 2, 0, 1e-4, 0.0), (0.5, 0, 1, 1e-4, 0.0), (0.3, 1, 2, 0.05, 1e-3), (0.7, 3, 0, 0.0, 0.0)])
def test_plateau_cuts_as_torchs_reduce_lr_on_plateau(mode, factor, patience, cooldown, threshold,
                                                      min_lr):
    torch = pytest.importorskip("torch")
    from mpinn.lr import Plateau
    rng = np.random.default_rng(patience)
    # improving for 20 epochs, then noise around a level: cuts, cooldowns, a floor
    trend = np.minimum(np.arange(80), 20) * (0.05 if mode == "min" else -0.05)
    values = list(rng.normal(0, 0.1, 80) - trend + 3.0)
    o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.8)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode=mode, factor=factor,
                                                     patience=patience, cooldown=cooldown,
                                                     threshold=threshold, min_lr=min_lr)
    mine = Plateau(0.8, mode, factor, patience, cooldown, threshold, min_lr)
    expect, got = [], []
    for v in values:
        ref.step(v)
        mine.step(v)
        expect.append(o.param_groups[0]["lr"])
        got.append(mine.lr)
    assert len(set(got)) > 2  # it did cut, more than once
    np.testing.assert_allclose(got, expect, rtol=1e-12)


def test_plateau_schedule_and_monitor_drive_the_run_and_resume_exactly(rising, tmp_path):
    """The validation loss rises: the rate is cut after every second stalled epoch (patience 1),
    as torch's scheduler fed the same losses cuts it; killed mid-run and resumed, the run ends as
    the straight one. With --monitor val_accuracy, best.h5 is the most accurate epoch's."""
    torch = pytest.importorskip("torch")
    train, val = rising
    args = ["--data", train, "--val-data", val, *COMMON, "--epochs", 8, "--lr-schedule",
            "plateau", "--plateau-patience", 1, "--plateau-factor", "0.5"]
    ok(run_mpinn(2, "train", *args, "--run-dir", tmp_path / "straight"))
    records = epochs(tmp_path / "straight")
    o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1)
    for r in records:
        ref.step(r["val_loss"])
        assert r["lr_next"] == pytest.approx(o.param_groups[0]["lr"], rel=1e-12)
    assert records[-1]["lr_next"] < 0.02 / 2
    train_lr = [json.loads(l) for l in open(tmp_path / "straight" / "metrics.jsonl")
                if '"kind": "train"' in l]
    assert train_lr[-1]["lr"] == pytest.approx(records[-2]["lr_next"])  # the last epoch's rate
    r = run_mpinn(2, "train", *args, "--run-dir", tmp_path / "res",
                  env={"MPINN_FAULT": "kill:rank=1:step=45"}, timeout=60)
    assert r.returncode != 0
    assert "plateau" in checkpoint.load(str(tmp_path / "res" / "checkpoint.h5")).state
    ok(run_mpinn(2, "train", *args, "--resume", "--run-dir", tmp_path / "res"))
    np.testing.assert_array_equal(
        checkpoint.load(str(tmp_path / "res" / "checkpoint.h5")).params,
        checkpoint.load(str(tmp_path / "straight" / "checkpoint.h5")).params)
    ok(run_mpinn(2, "train", "--data", train, "--val-data", val, *COMMON, "--epochs", 6,
                 "--early-stop", 10, "--monitor", "val_accuracy", "--run-dir", tmp_path / "acc"))
    accuracy = [e["val_accuracy"] for e in epochs(tmp_path / "acc")]
    best = checkpoint.load(str(tmp_path / "acc" / "best.h5"))
    assert best.epoch == int(np.argmax(accuracy)) + 1
