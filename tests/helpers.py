"""Test helpers: real `mpiexec -n K` runs of mpinn with a timeout, small HDF5 data sets written
by h5py into temporary directories, and figures of the bundled data derived from the file.
Test modules import them by name (`from helpers import run_mpinn, ok`); conftest.py holds only
pytest's hooks and session fixtures."""
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

# the unit tier (make test-fast): a test is skipped where it would launch mpiexec
UNIT_TIER = os.environ.get("MPINN_TEST_TIER") == "unit"
ROOT = Path(__file__).resolve().parent.parent
DIGITS_TRAIN = ROOT / "data" / "digits-train.h5"
DIGITS_TEST = ROOT / "data" / "digits-test.h5"


def rows_of(path, key="X"):
    with h5py.File(path, "r") as f:
        return f[key].shape[0]


def steps_per_epoch(path=DIGITS_TRAIN, batch=64):
    """Optimizer steps in one epoch of a data file at a global batch (64: train's default)."""
    return -(-rows_of(path) // batch)


def mpiexec():
    if UNIT_TIER:
        pytest.skip("launches MPI ranks: the mpi tier, run by make test")
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        pytest.fail("no mpiexec: install the mpich extra (pip install -e '.[mpich,test]')")
    return found


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    ended: float = 0.0  # wall-clock time.time() when the job had exited


def mpinn_command(ranks, *args):
    return [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpinn", *map(str, args)]


def mpinn_env(env=None):
    return {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}


def run_mpinn(ranks, *args, timeout=120, env=None, cwd=None, preexec_fn=None):
    """`mpiexec -n ranks python -m mpinn args...`; fails the test (never hangs) past timeout."""
    cmd = mpinn_command(ranks, *args)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpinn_env(env),
                           cwd=cwd or ROOT, start_new_session=True, preexec_fn=preexec_fn)
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"hung: {' '.join(cmd)} still running after {timeout} s\n{e.stdout}\n{e.stderr}"
        )
    return Run(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0, time.time())


def run_many(jobs, tmp, timeout=300):
    """{key: (ranks, argv) or (ranks, argv, working folder)} -> {key: Run}: the jobs of each rank
    count in one `mpiexec -n ranks` launch (tests/many.py runs them in turn in the same processes),
    so that a module comparing many small trainings pays the launch and the imports once per rank
    count, not once per job. A Run's output is every rank's, as a launch of its own would show.
    Only for jobs that end by returning (not by a signal, an abort or a killed rank)."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    by_ranks = {}
    for key, (ranks, argv, *cwd) in jobs.items():
        by_ranks.setdefault(ranks, []).append(
            (key, [[str(a) for a in argv], str(cwd[0]) if cwd else None]))
    runs = {}
    for ranks, group in sorted(by_ranks.items()):
        jobs_file, results_file = tmp / f"jobs-{ranks}.json", tmp / f"results-{ranks}.json"
        jobs_file.write_text(json.dumps([job for _, job in group]))
        cmd = [mpiexec(), "-n", str(ranks), sys.executable, str(Path(__file__).parent / "many.py"),
               str(jobs_file), str(results_file)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               env=mpinn_env(), cwd=ROOT, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"hung: {' '.join(cmd)} still running after {timeout} s\n{e.stdout}\n"
                        f"{e.stderr}")
        assert p.returncode == 0 and results_file.exists(), (
            f"{len(group)} jobs on {ranks} ranks: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
        seconds = (time.perf_counter() - t0) / len(group)
        for (key, (argv, _)), r in zip(group, json.loads(results_file.read_text())):
            assert not r["threads_left"], f"{argv} left threads running: {r['threads_left']}"
            runs[key] = Run(r["returncode"], r["stdout"], r["stderr"], seconds, time.time())
    return runs


def start_mpinn(ranks, *args, env=None):
    """The same job started in the background (to signal it); read with finish()."""
    return subprocess.Popen(mpinn_command(ranks, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=mpinn_env(env), cwd=ROOT,
                            start_new_session=True)


def finish(proc, timeout=60):
    t0 = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        pytest.fail(f"hung: still running {timeout} s after it was signalled")
    return Run(proc.returncode, out, err, time.perf_counter() - t0, time.time())


def ok(run):
    assert run.returncode == 0, (
        f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    )
    return run


def write_classification(path, n, features, classes, seed=0, **extra):
    """A learnable classification set: labels from a random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x @ rng.normal(size=(features, classes))).argmax(1).astype(np.int64)
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = x, y
        for k, v in extra.items():
            f[k] = v
    return str(path)


def write_regression(path, n, features, targets, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(features, targets))).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = x, y
    return str(path)


SHM = Path("/dev/shm")


def mpich_segments():
    return set(SHM.glob("mpich_shm_*")) if SHM.is_dir() else set()


def mapped_segments():
    """The /dev/shm files some live process has mapped (a running MPI job's, anyone's)."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped |= {
                Path(line.split(None, 5)[5].strip())
                for line in maps.read_text().splitlines()
                if "/dev/shm/" in line and len(line.split(None, 5)) == 6
            }
        except OSError:
            continue
    return mapped
