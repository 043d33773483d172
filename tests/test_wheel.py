"""mpinn as a user installs it: a wheel built from a copy of the sources, installed (non-editable)
into a fresh venv, then `mpirun -n 2 mpinn train`, `mpinn evaluate`, `mpinn predict` and `mpinn jobs
slurm` from an empty folder, with the bundled data and job templates found inside the package."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, mpinn_env, steps_per_epoch


def run(cmd, cwd, env=None, timeout=240):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, empty working folder): the wheel installed with its dependencies."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # building writes build/ and *.egg-info: never into the checkout
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp / "dist"), str(src)], tmp)
    (wheel,) = (tmp / "dist").glob("mpinn-*.whl")
    run([sys.executable, "-m", "venv", str(tmp / "venv")], tmp)
    bin_dir = tmp / "venv" / "bin"
    run([str(bin_dir / "pip"), "install", "-q", f"{wheel}[mpich]"], tmp, timeout=600)
    empty = tmp / "empty"
    empty.mkdir()
    env = mpinn_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                     "VIRTUAL_ENV": str(tmp / "venv")})
    env.pop("PYTHONPATH", None)
    return bin_dir, empty, env


def test_train_evaluate_predict_jobs_from_an_empty_folder(installed):
    bin_dir, empty, env = installed
    where = run(["python", "-c", "import mpinn, sys; print(mpinn.__file__); "
                 "print('mpi4py.MPI' in sys.modules)"], empty, env).split()
    assert where[0].startswith(str(bin_dir.parent)) and where[1] == "False"  # no MPI on import
    out = run(["mpirun", "-n", "2", "mpinn", "train", "--epochs", "1"], empty, env)
    assert f"done, {steps_per_epoch()} steps" in out
    result = json.loads(run(["mpinn", "evaluate", "--json"], empty, env))
    assert result["data"].startswith(str(bin_dir.parent)) and result["accuracy"] > 0.3
    run(["mpinn", "predict"], empty, env)
    job = run(["mpinn", "jobs", "slurm", "--nodes", "3"], empty, env)
    assert "#SBATCH --nodes=3" in job and "python -m mpinn train" in job
    assert sorted(os.listdir(empty)) == ["predictions.h5", "runs"]
