"""A real one-node SLURM cluster (Debian's slurmctld, slurmd, munge; tests/slurm/up.sh) runs the
SLURM job files with sbatch: the train job and a small scaling study. Skipped only where apt-get is
missing or we are not root; elsewhere, including CI, it runs."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from mpinn import checkpoint

HERE = ROOT / "tests" / "slurm"
TERMINAL_WAIT = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no apt-get to install SLURM from Debian's packages")
    if os.geteuid() != 0:
        pytest.skip("starting SLURM daemons needs root")
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "SLURM_LOCAL_STATE": str(state)}
    up = subprocess.run(["bash", str(HERE / "up.sh")], env=env, capture_output=True, text=True,
                        timeout=600, stdin=subprocess.DEVNULL)
    try:
        assert up.returncode == 0, f"slurm up failed:\n{up.stdout}\n{up.stderr}"
        yield state
    finally:
        subprocess.run(["bash", str(HERE / "down.sh")], env=env, capture_output=True, timeout=120)


def sbatch_wait(job_file, workdir, env):
    """Submit, poll scontrol every 0.5 s until the job ends; return (state, exit code, output)."""
    out = workdir / "job-%j.out"
    job_id = subprocess.run(["sbatch", "--parsable", f"--chdir={workdir}", f"--output={out}",
                             str(job_file)], env=env, capture_output=True, text=True, check=True,
                            timeout=60).stdout.strip().split(";")[0]
    deadline = time.time() + TERMINAL_WAIT
    state = ""
    while time.time() < deadline:
        info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                              text=True).stdout
        fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
        state = fields.get("JobState", "")
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", ""):
            text = (workdir / f"job-{job_id}.out").read_text()
            return job_id, state, fields.get("ExitCode", ""), text
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} still {state} after {TERMINAL_WAIT} s")


def job_env(**extra):
    return {**os.environ, "VENV": sys.prefix, "DATA": str(ROOT / "data" / "digits-train.h5"),
            "VAL_DATA": str(ROOT / "data" / "digits-test.h5"), **extra}


def test_train_job_file_under_slurm(cluster, tmp_path):
    job_id, state, exit_code, out = sbatch_wait(ROOT / "jobs" / "slurm" / "train.sbatch", tmp_path,
                                                job_env(ARGS="--epochs 2"))
    assert (state, exit_code) == ("COMPLETED", "0:0"), out
    ckpt = checkpoint.load(str(tmp_path / "runs" / job_id / "checkpoint.h5"))  # named by job id
    assert ckpt.global_step == 2 * 23 and ckpt.config["ranks"] == 2  # 2 ranks through srun
    assert out.count("mpinn train: done") == 1


def test_scaling_job_file_under_slurm(cluster, tmp_path):
    job_id, state, exit_code, out = sbatch_wait(
        ROOT / "jobs" / "slurm" / "scaling.sbatch", tmp_path,
        job_env(BENCH_ARGS="--features 64 --hidden 32 --steps 5 --warmup 2 --sweep-max 65536",
                BATCH="64"))
    assert (state, exit_code) == ("COMPLETED", "0:0"), out
    report = tmp_path / "runs" / f"scaling-{job_id}"
    assert sorted(os.listdir(report / "raw")) == ["bench-00001.json", "bench-00002.json"]
    text = (report / "report.md").read_text()
    assert "| 1 | 1 |" in text and "| 2 | 1 |" in text and "α =" in text
    for png in ("speedup.png", "efficiency.png", "breakdown.png", "projection.png", "allreduce.png"):
        assert (report / png).stat().st_size > 10_000, png
