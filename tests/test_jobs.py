"""Job files: `mpinn jobs` renders valid directives; the PBS files' directives parse and their
bodies run with the environment a PBS scheduler sets (PBS_NODEFILE, PBS_O_WORKDIR, PBS_JOBID,
PBS_NP). SLURM files are run by a real SLURM cluster in test_slurm.py."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from helpers import ROOT, steps_per_epoch
from mpinn import checkpoint
from mpinn.cli import parse
from mpinn.errors import UsageError
from mpinn.hpc.jobs import render

PBS_DIRECTIVE = re.compile(
    r"^#PBS (-N [\w.-]+|-j oe|-r [yn]|-q \S+|-A \S+|"
    r"-l select=\d+:ncpus=\d+:mpiprocs=\d+(:ompthreads=\d+)?|-l walltime=\d{1,3}:\d{2}:\d{2})$")


def pbs_directives(text):
    return [l for l in text.splitlines() if l.startswith("#PBS")]


def rendered(argv):
    _, cfg, _ = parse(["jobs", *argv])
    return render(cfg)


@pytest.mark.parametrize("kind", ["train", "scaling", "sweep"])
def test_slurm_rendering_sets_the_directives(kind):
    text = rendered(["slurm", "--kind", kind, "--nodes", "4", "--ranks-per-node", "32", "--threads",
                     "2", "--time", "1-02:00:00", "--partition", "cpu", "--account", "abc123",
                     "--job-name", "myrun"])
    d = [l.split("#", 2)[1].strip() if l.startswith("#SBATCH") else None
         for l in text.splitlines() if l.startswith("#SBATCH")]
    for want in ("SBATCH --nodes=4", "SBATCH --ntasks-per-node=32", "SBATCH --cpus-per-task=2",
                 "SBATCH --time=1-02:00:00", "SBATCH --partition=cpu", "SBATCH --account=abc123",
                 "SBATCH --job-name=myrun"):
        assert want in d, (want, d)
    assert "##SBATCH" not in text  # partition and account were uncommented
    assert text.count("#SBATCH --nodes=") == 1


@pytest.mark.parametrize("kind", ["train", "scaling", "sweep"])
def test_pbs_templates_and_renderings_parse(kind):
    template = (ROOT / "jobs" / "pbs" / f"{kind}.pbs").read_text()
    text = rendered(["pbs", "--kind", kind, "--nodes", "3", "--ranks-per-node", "8", "--threads",
                     "2", "--time", "12:00:00", "--partition", "workq", "--account", "proj"])
    for t in (template, text):
        bad = [l for l in pbs_directives(t) if not PBS_DIRECTIVE.match(l)]
        assert not bad, bad
    assert "#PBS -l select=3:ncpus=16:mpiprocs=8:ompthreads=2" in text
    assert (
        "#PBS -l walltime=12:00:00" in text and "#PBS -q workq" in text and "#PBS -A proj" in text
    )
    # shell syntax of template and rendering
    for t in (template, text):
        subprocess.run(["bash", "-n"], input=t, text=True, check=True)


def test_rendering_errors():
    with pytest.raises(UsageError, match="--time must be HH:MM:SS"):
        rendered(["pbs", "--time", "1-00:00:00"])
    with pytest.raises(UsageError, match="--time must be"):
        rendered(["slurm", "--time", "5h"])
    with pytest.raises(UsageError, match="--nodes must be positive"):
        rendered(["slurm", "--nodes", "0"])
    with pytest.raises(UsageError, match="invalid choice"):
        rendered(["lsf"])


@pytest.mark.parametrize("scheduler,kind", [("slurm", "train"), ("pbs", "sweep"),
                                            ("slurm", "scaling")])
def test_jobs_take_their_data_options_and_venv(tmp_path, scheduler, kind):
    """The job's defaults become what was given (its variables still win at submission), the
    header's submit line names the file written, and the file stays valid bash."""
    data = [] if kind == "scaling" else ["--data", "d.h5", "--val-data", "v.h5"]
    text = rendered([scheduler, "--kind", kind, *data, "--args", "--epochs 50 --hidden 256,256",
                     "--venv", sys.prefix, "--out", "my.job"])
    lines = text.splitlines()
    args = "BENCH_ARGS" if kind == "scaling" else "ARGS"
    assert f"{args}=${{{args}:-'--epochs 50 --hidden 256,256'}}" in [l.split(" #")[0].strip()
                                                                     for l in lines]
    assert f"VENV=${{VENV-{sys.prefix}}}" in text
    if data:
        assert f"DATA=${{DATA:-{os.path.abspath('d.h5')}}}" in text
        assert f"VAL_DATA=${{VAL_DATA:-{os.path.abspath('v.h5')}}}" in text
    submit = "sbatch" if scheduler == "slurm" else "qsub"
    header = "\n".join(lines[1:4])
    assert re.search(rf"{submit} (-v GRID=grid\.toml )?my\.job", header) and "jobs/" not in header
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_job_options_that_cannot_apply_are_refused(tmp_path):
    with pytest.raises(UsageError, match="--data and --val-data are for --kind train or sweep"):
        rendered(["slurm", "--kind", "scaling", "--data", "d.h5"])
    with pytest.raises(UsageError, match=f"--venv {tmp_path}: no venv there"):
        rendered(["pbs", "--venv", str(tmp_path)])


def test_a_job_without_its_venv_fails_at_once_naming_it(tmp_path):
    env = {**pbs_env(tmp_path), "VENV": str(tmp_path / "gone")}
    p = subprocess.run(["bash", str(ROOT / "jobs" / "pbs" / "train.pbs")], env=env, cwd="/",
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and not (tmp_path / "runs").exists()
    assert f"mpinn job: no venv at {tmp_path / 'gone'} (set VENV; empty for none)" in p.stderr


def pbs_env(tmp_path, np_=2):
    nodefile = tmp_path / "nodes"
    nodefile.write_text((socket.gethostname() + "\n") * np_)
    return {**os.environ, "PBS_NODEFILE": str(nodefile), "PBS_O_WORKDIR": str(tmp_path),
            "PBS_JOBID": "4242.pbs-server", "PBS_NP": str(np_), "OMP_NUM_THREADS": "1",
            "VENV": sys.prefix, "DATA": str(ROOT / "data" / "digits-train.h5"),
            "VAL_DATA": str(ROOT / "data" / "digits-test.h5")}


def test_pbs_train_job_body_runs(tmp_path):
    env = {**pbs_env(tmp_path), "ARGS": "--epochs 2"}
    p = subprocess.run(["bash", str(ROOT / "jobs" / "pbs" / "train.pbs")], env=env, cwd="/",
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    run_dir = tmp_path / "runs" / "4242"  # named after the job id, under PBS_O_WORKDIR
    ckpt = checkpoint.load(str(run_dir / "checkpoint.h5"))
    assert ckpt.global_step == 2 * steps_per_epoch() and ckpt.config["ranks"] == 2
    assert p.stdout.count("mpinn train: done") == 1


def test_pbs_scaling_job_body_runs(tmp_path):
    env = {**pbs_env(tmp_path), "BENCH_ARGS": "--features 32 --hidden 16 --steps 3 --warmup 1 "
                                              "--sweep-max 4096", "BATCH": "32"}
    p = subprocess.run(["bash", str(ROOT / "jobs" / "pbs" / "scaling.pbs")], env=env, cwd="/",
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "runs" / "scaling-4242"
    assert sorted(os.listdir(out / "raw")) == ["bench-00001.json", "bench-00002.json"]
    assert (out / "report.md").exists() and (out / "speedup.png").exists()
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("1,") and rows[2].startswith("2,")
    assert json.loads((out / "model.json").read_text())["mode"] == "strong"


def test_pbs_sweep_job_body_runs_and_a_resubmitted_job_continues(tmp_path):
    (tmp_path / "grid.toml").write_text("[grid]\nlr = [0.01, 0.003]\nhidden = ['16', '32']\n")
    env = {**pbs_env(tmp_path), "GRID": "grid.toml", "ARGS": "--epochs 1"}
    p = subprocess.run(["bash", str(ROOT / "jobs" / "pbs" / "sweep.pbs")], env=env, cwd="/",
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "runs" / "sweep-4242"  # under PBS_O_WORKDIR, named after the job id
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and all(r.endswith(",ok,") for r in rows[1:]), rows
    assert p.stdout.count("mpinn sweep: best ") == 1
    p = subprocess.run(["bash", str(ROOT / "jobs" / "pbs" / "sweep.pbs")], env=env, cwd="/",
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "4 trials, 0 to train" in p.stdout, p.stderr
