"""The fault matrix, with real mpiexec ranks and timeouts: an exception or SIGKILL on one rank,
SIGKILL while rank 0 writes a checkpoint, SIGTERM/SIGINT, NaN in a step, a full disk; every case
ends the whole job quickly with one clear message, leaves an intact checkpoint, and --resume then
gives exactly the parameters of an uninterrupted run."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from helpers import (ROOT, finish, mpinn_command, mpinn_env, ok, run_mpinn, start_mpinn,
                     steps_per_epoch)
from mpinn import checkpoint

EPOCHS = 3
SPE = steps_per_epoch()  # of the bundled digits at the default global batch (64)
MID2 = SPE + 7           # a step in the middle of epoch 2
ARGS = ["--epochs", EPOCHS, "--log-every", 5]
FAULT_TO_EXIT = 30.0  # seconds from a fault to the job's end; a hang is what this catches


def fault_time(run):
    stamps = re.findall(r"\[t=([\d.]+)\]", run.stderr)
    assert stamps, run.stderr
    return float(stamps[0])


def errors(run):
    return [l for l in run.stderr.splitlines() if l.startswith("mpinn: error")]


def load(path):
    return checkpoint.load(str(path))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    ok(run_mpinn(2, "train", "--run-dir", d, *ARGS))
    return load(d / "checkpoint.h5")


@pytest.mark.parametrize("spec,rank,where", [
    ("raise:rank=0:step=5", 0, "at step, step 5"),
    (f"raise:rank=2:step={SPE + 17}", 2, f"at step, step {SPE + 17}"),
    ("raise:rank=1:at=load", 1, "at load"),
    ("raise:rank=2:at=evaluate:step=1", 2, f"at evaluate, step {SPE}"),
    ("raise:rank=0:at=checkpoint:step=1", 0, f"at checkpoint, step {SPE}"),
])
def test_exception_on_one_rank_ends_every_rank(tmp_path, spec, rank, where):
    r = run_mpinn(3, "train", "--run-dir", tmp_path, *ARGS, env={"MPINN_FAULT": spec}, timeout=60)
    assert r.returncode == 1, r.stderr  # docs/faults.md: an exception on any rank
    lines = errors(r)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"mpinn: error on rank {rank} of 3: RuntimeError: injected fault "
                               f"{where}")
    assert r.ended - fault_time(r) < FAULT_TO_EXIT


def test_sigkill_of_one_rank_ends_the_job_and_resume_is_exact(tmp_path, uninterrupted):
    r = run_mpinn(2, "train", "--run-dir", tmp_path, *ARGS,
                  env={"MPINN_FAULT": f"kill:rank=1:step={MID2}"}, timeout=60)
    assert r.returncode != 0
    assert r.ended - fault_time(r) < FAULT_TO_EXIT
    assert load(tmp_path / "checkpoint.h5").global_step == SPE  # the epoch-1 checkpoint, intact
    ok(run_mpinn(2, "train", "--run-dir", tmp_path, *ARGS, "--resume"))
    resumed = load(tmp_path / "checkpoint.h5")
    assert resumed.global_step == uninterrupted.global_step == 3 * SPE
    np.testing.assert_array_equal(resumed.params, uninterrupted.params)


def test_sigkill_while_rank_0_writes_a_checkpoint(tmp_path, uninterrupted):
    r = run_mpinn(2, "train", "--run-dir", tmp_path, *ARGS,
                  env={"MPINN_FAULT": f"kill:rank=0:step={MID2}:at=checkpoint"}, timeout=60)
    assert r.returncode != 0 and f"at checkpoint, step {2 * SPE}" in r.stderr
    assert r.ended - fault_time(r) < FAULT_TO_EXIT
    assert load(tmp_path / "checkpoint.h5").global_step == SPE  # the previous one loads
    ok(run_mpinn(2, "train", "--run-dir", tmp_path, *ARGS, "--resume"))
    np.testing.assert_array_equal(load(tmp_path / "checkpoint.h5").params, uninterrupted.params)
    assert not list(tmp_path.glob("checkpoint.h5.tmp-*"))  # the dead writer's temporary is gone


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_a_final_checkpoint_then_resume_is_exact(tmp_path, sig, code):
    args = ["--epochs", 400, "--log-every", 1000, "--run-dir", tmp_path / "a"]
    proc = start_mpinn(2, "train", *args)
    metrics = tmp_path / "a" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.2)
    proc.send_signal(sig)  # to mpiexec, which forwards it to every rank (as schedulers do)
    sent = time.time()
    r = finish(proc)
    assert r.returncode == code, r.stderr
    assert r.ended - sent < FAULT_TO_EXIT
    lines = errors(r)
    assert len(lines) == 1 and f"stopped by {sig.name} after step" in lines[0], r.stderr
    stopped_at = int(re.search(r"after step (\d+)", lines[0]).group(1))
    assert load(tmp_path / "a" / "checkpoint.h5").global_step == stopped_at
    target = stopped_at + 9
    ok(run_mpinn(2, "train", *args, "--resume", "--steps", target))
    ok(run_mpinn(2, "train", "--epochs", 400, "--steps", target, "--run-dir", tmp_path / "b"))
    a, b = load(tmp_path / "a" / "checkpoint.h5"), load(tmp_path / "b" / "checkpoint.h5")
    assert a.global_step == b.global_step == target
    np.testing.assert_array_equal(a.params, b.params)


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    r = run_mpinn(
        2, "train", "--run-dir", tmp_path, *ARGS, env={"MPINN_FAULT": f"nan:rank=1:step={MID2}"}
    )
    assert r.returncode == 3
    lines = errors(r)
    assert len(lines) == 1 and f"non-finite loss or gradient at step {MID2} (epoch 2)" in lines[0]
    assert f"the last good checkpoint {tmp_path}/checkpoint.h5 (step {SPE}) is kept" in lines[0]
    ckpt = load(tmp_path / "checkpoint.h5")
    assert ckpt.global_step == SPE and np.isfinite(ckpt.params).all()


def test_nan_step_skipped_on_request(tmp_path):
    r = ok(run_mpinn(2, "train", "--run-dir", tmp_path, *ARGS, "--on-nonfinite", "skip",
                     env={"MPINN_FAULT": f"nan:rank=1:step={MID2}"}))
    assert (
        r.stdout.count(f"step {MID2}: non-finite loss or gradient, update skipped (1 so far)") == 1
    )
    summary = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][-1]
    assert summary["skipped_steps"] == 1 and summary["step"] == 3 * SPE
    assert np.isfinite(load(tmp_path / "checkpoint.h5").params).all()


def test_full_disk_when_checkpointing_keeps_the_old_checkpoint(tmp_path):
    """A tmpfs with room for one checkpoint (and the metrics), not for a second beside it. It is
    mounted in a private mount namespace that only the job lives in (unshare --mount), so it
    vanishes with the job: nothing stays mounted even if pytest itself is killed. The run folder
    is copied out before the namespace ends."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a private mount namespace")
    ok(run_mpinn(1, "train", "--run-dir", tmp_path / "probe", "--epochs", 1))
    kib = ((tmp_path / "probe" / "checkpoint.h5").stat().st_size * 3 // 2) // 1024 + 8
    mount, copy = tmp_path / "tiny", tmp_path / "copy"
    mount.mkdir()
    run_dir = mount / "run"
    job = " ".join(shlex.quote(a) for a in mpinn_command(2, "train", "--run-dir", run_dir,
                                                         "--epochs", 2))
    script = (f"mount -t tmpfs -o size={kib}k tmpfs {shlex.quote(str(mount))} || exit 99\n"
              f"{job}\nrc=$?\ncp -a {shlex.quote(str(run_dir))} {shlex.quote(str(copy))}\n"
              "exit $rc\n")
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120, env=mpinn_env(), cwd=ROOT,
                       start_new_session=True)
    if p.returncode == 99 or "unshare failed" in p.stderr:
        pytest.skip(f"no private tmpfs here (needs root): {p.stderr.strip()[-200:]}")
    assert p.returncode == 1, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.startswith("mpinn: error")]
    assert len(lines) == 1 and f"cannot write checkpoint {run_dir}/checkpoint.h5" in lines[0]
    assert "No space left on device; the previous checkpoint is intact" in lines[0]
    assert "Traceback" not in p.stderr
    assert load(copy / "checkpoint.h5").global_step == SPE
    assert not list(copy.glob("checkpoint.h5.tmp-*"))
    assert not os.listdir(mount)  # the tmpfs was never mounted out here


def test_resume_on_another_number_of_ranks(tmp_path):
    ok(run_mpinn(2, "train", "--run-dir", tmp_path, "--epochs", 1))
    r = ok(run_mpinn(3, "train", "--run-dir", tmp_path, "--epochs", 2, "--resume"))
    assert "note: resuming on 3 ranks a run checkpointed on 2" in r.stdout
    assert "epoch 2/2 step" in r.stdout and "epoch 1/2" not in r.stdout
    assert load(tmp_path / "checkpoint.h5").global_step == 2 * SPE


def test_keep_checkpoints_in_a_run(tmp_path):
    ok(run_mpinn(2, "train", "--run-dir", tmp_path, *ARGS, "--keep-checkpoints", 2))
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == [f"step-{2 * SPE:07d}.h5", f"step-{3 * SPE:07d}.h5"]
    assert load(tmp_path / "checkpoints" / kept[0]).global_step == 2 * SPE


def test_stall_watchdog_names_the_missing_rank_and_aborts(tmp_path):
    r = run_mpinn(3, "train", "--run-dir", tmp_path, *ARGS, "--stall-warning", 1,
                  "--stall-timeout", 5, env={"MPINN_FAULT": "hang:rank=1:step=5"}, timeout=60)
    assert r.returncode == 124, r.stderr  # docs/faults.md: --stall-timeout
    assert "stall at step 5" in r.stderr
    assert "ranks waiting in the collective: 0, 2; ranks that have not arrived: 1" in r.stderr
    assert "more than --stall-timeout 5 s; aborting the job" in r.stderr
