"""A real one-node SLURM cluster (Debian's slurmctld, slurmd, munge) runs the SLURM job files with
sbatch: the train job and a small scaling study. The cluster is private to the test (tests/slurm/
up.sh): its config, munge key and socket, spool, logs and pids live in a temporary folder, it
listens on free ports of its own, and tear-down cancels only the jobs this test submitted and stops
only its own daemons. Skipped with the reason where Slurm is not installed or we are not root
(.ci/run installs the packages first)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, steps_per_epoch
from mpinn import checkpoint

HERE = ROOT / "tests" / "slurm"
TERMINAL_WAIT = 200  # seconds a job may take; below pytest's own 300 s so this one acts first


def free_port_pair():
    """A TCP port p such that p and p + 1 are free now (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    pytest.fail("no two consecutive free TCP ports")


@pytest.fixture(scope="module")
def cluster():
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(c)]
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}; apt-get install "
                    "--no-install-recommends slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("starting Slurm daemons needs root")
    # not under pytest's own temporary folder: that is mode 0700 and munged runs as user munge
    state = Path(tempfile.mkdtemp(prefix="mpinn-slurm-"))
    state.chmod(0o755)
    env = {**os.environ, "SLURM_LOCAL_STATE": str(state),
           "SLURM_LOCAL_PORT": str(free_port_pair()), "SLURM_CONF": str(state / "slurm.conf")}
    try:
        up = subprocess.run(["bash", str(HERE / "up.sh")], env=env, capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert up.returncode == 0, f"slurm up failed:\n{up.stdout}\n{up.stderr}"
        yield env
    finally:
        subprocess.run(["bash", str(HERE / "down.sh")], env=env, capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def sbatch_wait(job_file, workdir, env):
    """Submit, poll scontrol every 0.5 s until the job ends; return (id, state, exit code,
    output)."""
    out = workdir / "job-%j.out"
    job_id = subprocess.run(["sbatch", "--parsable", f"--chdir={workdir}", f"--output={out}",
                             str(job_file)], env=env, capture_output=True, text=True, check=True,
                            timeout=60).stdout.strip().split(";")[0]
    with open(os.path.join(env["SLURM_LOCAL_STATE"], "jobs"), "a") as fh:
        fh.write(job_id + "\n")  # down.sh cancels these and no others
    deadline = time.time() + TERMINAL_WAIT
    state = ""
    while time.time() < deadline:
        info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                              text=True, env=env, timeout=30).stdout
        fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
        state = fields.get("JobState", "")
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", ""):
            text = (workdir / f"job-{job_id}.out").read_text()
            return job_id, state, fields.get("ExitCode", ""), text
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    pytest.fail(f"job {job_id} still {state} after {TERMINAL_WAIT} s")


def job_env(cluster, **extra):
    """The job's environment: this venv; no DATA, so the job trains on the bundled digits."""
    return {**cluster, "VENV": sys.prefix, **extra}


def test_train_job_file_under_slurm(cluster, tmp_path):
    job_id, state, exit_code, out = sbatch_wait(ROOT / "jobs" / "slurm" / "train.sbatch", tmp_path,
                                                job_env(cluster, ARGS="--epochs 2"))
    assert (state, exit_code) == ("COMPLETED", "0:0"), out
    ckpt = checkpoint.load(str(tmp_path / "runs" / job_id / "checkpoint.h5"))  # named by job id
    assert (
        ckpt.global_step == 2 * steps_per_epoch() and ckpt.config["ranks"] == 2
    )  # 2 ranks through srun
    assert out.count("mpinn train: done") == 1


def test_scaling_job_file_under_slurm(cluster, tmp_path):
    job_id, state, exit_code, out = sbatch_wait(
        ROOT / "jobs" / "slurm" / "scaling.sbatch",
        tmp_path,
        job_env(
            cluster,
            BENCH_ARGS="--features 64 --hidden 32 --steps 5 --warmup 2 --sweep-max 65536",
            BATCH="64",
        ),
    )
    assert (state, exit_code) == ("COMPLETED", "0:0"), out
    report = tmp_path / "runs" / f"scaling-{job_id}"
    assert sorted(os.listdir(report / "raw")) == ["bench-00001.json", "bench-00002.json"]
    text = (report / "report.md").read_text()
    assert "| 1 | 1 x 1 |" in text and "| 2 | 1 x 2 |" in text and "α =" in text
    for png in (
        "speedup.png",
        "efficiency.png",
        "breakdown.png",
        "projection.png",
        "allreduce.png",
    ):
        assert (report / png).stat().st_size > 10_000, png


def test_sweep_job_file_under_slurm(cluster, tmp_path):
    (tmp_path / "grid.toml").write_text("[grid]\nlr = [0.01, 0.003, 0.03]\n")
    job_id, state, exit_code, out = sbatch_wait(
        ROOT / "jobs" / "slurm" / "sweep.sbatch", tmp_path,
        job_env(cluster, GRID="grid.toml", ARGS="--epochs 1"))
    assert (state, exit_code) == ("COMPLETED", "0:0"), out
    rows = (tmp_path / "runs" / f"sweep-{job_id}" / "results.csv").read_text().splitlines()
    assert len(rows) == 4 and all(r.endswith(",ok,") for r in rows[1:]), rows
    assert out.count("mpinn sweep: best ") == 1 and "on 2 rank(s) in 2 group(s) of 1" in out


def submit(job_file, workdir, env, *extra):
    out = workdir / "job-%j.out"
    job_id = subprocess.run(["sbatch", "--parsable", f"--chdir={workdir}", f"--output={out}",
                             *extra, str(job_file)], env=env, capture_output=True, text=True,
                            check=True, timeout=60).stdout.strip().split(";")[0]
    with open(os.path.join(env["SLURM_LOCAL_STATE"], "jobs"), "a") as fh:
        fh.write(job_id + "\n")  # down.sh cancels these and no others
    return job_id


def job_fields(job_id, env):
    info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                          text=True, env=env, timeout=30).stdout
    return dict(f.split("=", 1) for f in info.split() if "=" in f)


def wait_for(what, predicate, timeout=TERMINAL_WAIT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def test_train_job_near_its_time_limit_is_requeued_and_ends_as_an_uninterrupted_run(
    cluster, tmp_path
):
    """The job file asks Slurm for USR1 before its time limit (--signal=B:USR1@120) and to be
    requeueable. Here the test sends that USR1 itself (`scancel -b -s USR1`, which is what
    --signal does, without waiting minutes for a real limit). Slurm holds a requeued job for its
    credential lifetime + 1 s: the test cluster sets cred_expire=10 (the default, 120 s, is why
    sites see a 2-minute gap). The run checkpoints on the signal, the job requeues itself, the
    next start continues with --resume auto, and the weights are those of one uninterrupted
    run."""
    epochs = 300
    env = job_env(cluster, ARGS=f"--epochs {epochs} --log-every 100000")
    job_id = submit(ROOT / "jobs" / "slurm" / "train.sbatch", tmp_path, env)
    run_dir = tmp_path / "runs" / job_id
    wait_for("the first checkpoint", lambda: (run_dir / "checkpoint.h5").exists())
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True, timeout=30)
    wait_for("the requeue", lambda: job_fields(job_id, env).get("Restarts") == "1"
             and job_fields(job_id, env).get("JobState") == "PENDING")
    stopped_at = checkpoint.load(str(run_dir / "checkpoint.h5")).global_step
    fields = wait_for("the end of the job", lambda: (lambda f: f if f.get("JobState") not in (
        "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", None) else None)(
        job_fields(job_id, env)))
    out = (tmp_path / f"job-{job_id}.out").read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), out
    assert out.count("--resume auto: no checkpoint yet, a new run") == 1
    assert out.count("requeueing job") == 1 and out.count("--resume auto: continuing the run") == 1
    assert "stopped by SIGTERM after step" in out
    final = checkpoint.load(str(run_dir / "checkpoint.h5"))
    assert 0 < stopped_at < final.global_step == epochs * steps_per_epoch()
    straight = tmp_path / "straight"
    p = subprocess.run(
        [
            str(Path(sys.executable).parent / "mpiexec"),
            "-n",
            "2",
            sys.executable,
            "-m",
            "mpinn",
            "train",
            "--epochs",
            str(epochs),
            "--run-dir",
            str(straight),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    np.testing.assert_array_equal(
        final.params, checkpoint.load(str(straight / "checkpoint.h5")).params
    )


def test_mis_launch_under_srun_is_refused_and_mpiexec_inside_the_allocation_is_not(
    cluster, tmp_path
):
    """srun --mpi=none starts 2 processes that MPI does not connect (each a 1-rank world): each
    exits 2 naming the cause. mpiexec inside the same allocation runs Hydra's proxies in a step
    of fewer tasks than ranks: a sound launch, which trains on 2 ranks; doctor sees the same."""
    script = tmp_path / "launches.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --ntasks=2
. "{sys.prefix}/bin/activate"
srun --mpi=none -n 2 python -m mpinn train --epochs 1 --run-dir {tmp_path}/bad
echo "srun-none exit $?"
mpiexec -n 2 python -m mpinn train --epochs 1 --run-dir {tmp_path}/good
echo "mpiexec exit $?"
mpiexec -n 2 python -m mpinn doctor --json --sweep-max 1024 > {tmp_path}/doctor.json
echo "doctor exit $?"
""")
    job_id = submit(script, tmp_path, cluster)
    fields = wait_for(
        "the job",
        lambda: (
            lambda f: (
                f
                if f.get("JobState")
                not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", None)
                else None
            )
        )(job_fields(job_id, cluster)),
    )
    out = (tmp_path / f"job-{job_id}.out").read_text()
    assert fields["JobState"] == "COMPLETED", out
    assert "srun-none exit 2" in out and "mpiexec exit 0" in out and "doctor exit 0" in out, out
    refusals = [
        l for l in out.splitlines() if "srun started 2 processes (SLURM_STEP_NUM_TASKS=2)" in l
    ]
    assert len(refusals) == 2, out  # one line from each of the two unconnected processes
    assert not (tmp_path / "bad").exists()
    assert checkpoint.load(str(tmp_path / "good" / "checkpoint.h5")).config["ranks"] == 2
    doctor = json.loads((tmp_path / "doctor.json").read_text())
    assert doctor["world_size"] == 2 and doctor["broken"] == []
    assert (
        doctor["launcher"]["scheduler"] == "SLURM"
        and doctor["launcher"]["started"]["PMI_SIZE"] == 2
    )
