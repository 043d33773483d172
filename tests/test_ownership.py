"""Nothing lost, nothing silently wrong: a run folder belongs to one run (lock, refusal,
--overwrite), --resume is the same run (its own data and options), class counts from the data or
--classes, a damaged checkpoint.h5 falls back to the newest intact step checkpoint, evaluation and
checkpoint writes are timed on their own, and a second Ctrl-C ends a launcher-less run with 130."""
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from helpers import (finish, mpinn_env, ok, run_mpinn, start_mpinn, steps_per_epoch,
                     write_classification)
from mpinn import checkpoint

LONG = ["--epochs", 400, "--hidden", "256,256", "--log-every", 1]


def wait_for_metrics(run_dir, lines=1, timeout=60):
    path = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.1)
    pytest.fail(f"{path} has fewer than {lines} lines after {timeout} s")


def errors(run):
    return [l for l in run.stderr.splitlines() if l.startswith("mpinn: error")]


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_second_training_into_a_busy_folder_stops_at_once(tmp_path, ranks):
    first = start_mpinn(ranks, "train", "--run-dir", tmp_path, *LONG)
    try:
        wait_for_metrics(tmp_path)
        second = run_mpinn(ranks, "train", "--run-dir", tmp_path, "--overwrite", timeout=60)
        assert second.returncode == 2, second.stderr
        (line,) = errors(second)
        assert f"--run-dir {tmp_path} is in use by another training (pid " in line
        assert "wait for it to end or choose another --run-dir" in line
    finally:
        first.send_signal(signal.SIGTERM)  # a final checkpoint, then exit 143
    r = finish(first)
    assert r.returncode == 143, r.stderr
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kind"] in ("train", "epoch") for r in records)  # one run's lines, all whole


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    r = run_mpinn(2, "train", "--run-dir", tmp_path, "--epochs", 3,
                  env={"MPINN_FAULT": f"kill:rank=0:step={steps_per_epoch() + 3}"}, timeout=60)
    assert r.returncode != 0
    ok(run_mpinn(2, "train", "--run-dir", tmp_path, "--epochs", 3, "--resume"))
    assert checkpoint.load(str(tmp_path / "checkpoint.h5")).global_step == 3 * steps_per_epoch()


def test_overwrite_removes_the_old_run_first(tmp_path):
    ok(run_mpinn(2, "train", "--run-dir", tmp_path, "--epochs", 3, "--keep-checkpoints", 2))
    old = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(old) == 2
    ok(run_mpinn(2, "train", "--run-dir", tmp_path, "--epochs", 1, "--overwrite"))
    assert not (tmp_path / "checkpoints").exists()
    epochs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"epoch"' in l]
    assert [e["epoch"] for e in epochs if e["kind"] == "epoch"] == [1]  # the new run's only
    assert checkpoint.load(str(tmp_path / "checkpoint.h5")).global_step == steps_per_epoch()


def test_resume_continues_on_the_runs_own_data(tmp_path):
    data = write_classification(tmp_path / "own.h5", 150, 64, 3, seed=4)
    args = ["--data", data, "--val-data", "", "--hidden", "20", "--batch-size", 25, "--epochs", 4]
    ok(run_mpinn(2, "train", *args, "--run-dir", tmp_path / "straight"))
    ok(run_mpinn(2, "train", *args[:-1], 2, "--run-dir", tmp_path / "split"))
    ok(run_mpinn(2, "train", "--resume", "--epochs", 4, "--run-dir", tmp_path / "split"))
    resumed = checkpoint.load(str(tmp_path / "split" / "checkpoint.h5"))
    straight = checkpoint.load(str(tmp_path / "straight" / "checkpoint.h5"))
    assert resumed.config["data"] == data and resumed.arch.sizes == (64, 20, 3)
    np.testing.assert_array_equal(resumed.params, straight.params)


def test_class_count_from_classes_option_and_stored_names(tmp_path):
    data = write_classification(tmp_path / "four.h5", 80, 6, 4, seed=1)
    ok(run_mpinn(1, "train", "--data", data, "--epochs", 1, "--classes", 12, "--run-dir",
                 tmp_path / "a"))
    assert checkpoint.load(str(tmp_path / "a" / "checkpoint.h5")).arch.sizes[-1] == 12
    with h5py.File(data, "a") as f:
        f["y"].attrs["classes"] = ["cat", "dog", "emu", "gnu", "yak", "owl", "elk"]
    ok(run_mpinn(2, "train", "--data", data, "--epochs", 1, "--run-dir", tmp_path / "b"))
    assert checkpoint.load(str(tmp_path / "b" / "checkpoint.h5")).arch.sizes[-1] == 7


def test_resume_falls_back_to_the_newest_intact_step_checkpoint(tmp_path):
    ok(run_mpinn(2, "train", "--run-dir", tmp_path / "straight", "--epochs", 3))
    run_dir = tmp_path / "damaged"
    ok(run_mpinn(2, "train", "--run-dir", run_dir, "--epochs", 2, "--keep-checkpoints", 2))
    damaged = run_dir / "damaged.h5"  # a new file renamed over: the step link stays intact
    damaged.write_bytes((run_dir / "checkpoint.h5").read_bytes()[:3000])
    os.replace(damaged, run_dir / "checkpoint.h5")
    r = ok(run_mpinn(2, "train", "--run-dir", run_dir, "--epochs", 3, "--resume"))
    newest = run_dir / "checkpoints" / f"step-{2 * steps_per_epoch():07d}.h5"
    assert f"resuming from {newest} (step {2 * steps_per_epoch()}) instead" in r.stderr
    np.testing.assert_array_equal(
        checkpoint.load(str(run_dir / "checkpoint.h5")).params,
        checkpoint.load(str(tmp_path / "straight" / "checkpoint.h5")).params,
    )


def test_a_stalled_evaluation_is_timed_on_its_own(tmp_path):
    r = run_mpinn(2, "train", "--run-dir", tmp_path, "--epochs", 2, "--stall-timeout", 3,
                  env={"MPINN_FAULT": "hang:rank=1:at=evaluate:step=1"}, timeout=90)
    assert r.returncode == 124, r.stderr
    assert (f"the evaluation after step {steps_per_epoch()} has taken" in r.stderr
            and "more than --stall-timeout 3 s; aborting the job" in r.stderr)


def test_step_timeout_needs_100x_the_recent_median():
    from mpinn.runtime.watchdog import Watchdog
    w = Watchdog.__new__(Watchdog)  # the rule alone, no thread
    w.timeout, w.recent = 600.0, [10.0] * 5  # steps of 10 s: a 700 s step is slow, not stalled
    assert not w.timed_out(700, "step") and w.timed_out(1001, "step")
    assert w.timed_out(601, "checkpoint write")  # other phases: the limit alone
    w.recent = []
    assert w.timed_out(601, "step")
    w.timeout = 0.0
    assert not w.timed_out(10**6, "step")  # 0: wait for ever


def test_second_ctrl_c_without_a_launcher_exits_130(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "mpinn", "train", "--run-dir", tmp_path, *map(
        str, LONG), "--signal-grace", "60"], env=mpinn_env({"MPINN_FAULT": "hang:rank=0:step=30"}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_metrics(tmp_path, lines=25)  # in the hung step 30 now, so no final checkpoint
    os.killpg(p.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(p.pid, signal.SIGINT)
    sent = time.time()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert time.time() - sent < 20  # at once, not after the 60 s grace period
