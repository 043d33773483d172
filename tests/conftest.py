"""Shared test helpers: real `mpiexec -n K` runs of mpinn with a timeout, small HDF5 data sets
written by h5py into temporary directories, and figures of the bundled data derived from the file.

The suite leaves the machine as it found it: Numba's compile cache and Hypothesis's example
database live in a temporary folder for the session (set before mpinn or numba is imported, and
inherited by every mpiexec child), removed at the end."""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_SCRATCH = tempfile.mkdtemp(prefix="mpinn-tests-")
atexit.register(shutil.rmtree, _SCRATCH, True)
os.environ["NUMBA_CACHE_DIR"] = os.path.join(_SCRATCH, "numba-cache")
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = os.path.join(_SCRATCH, "hypothesis")

import h5py  # noqa: E402 - after NUMBA_CACHE_DIR, which numba reads once
import numpy as np  # noqa: E402
import pytest  # noqa: E402
ROOT = Path(__file__).resolve().parent.parent
DIGITS_TRAIN = ROOT / "data" / "digits-train.h5"
DIGITS_TEST = ROOT / "data" / "digits-test.h5"


def rows_of(path, key="X"):
    with h5py.File(path, "r") as f:
        return f[key].shape[0]


def steps_per_epoch(path=DIGITS_TRAIN, batch=64):
    """Optimizer steps in one epoch of a data file at a global batch (64: train's default)."""
    return -(-rows_of(path) // batch)


# Tiers: unit (no process launched through mpiexec), mpi (real `mpiexec -n K` runs), system
# (Slurm, two nodes, the wheel, the README's commands). `make test` runs them all; `make
# test-fast` (MPINN_TEST_TIER=unit, -m "not system") skips a test where it would launch mpiexec.
UNIT_TIER = os.environ.get("MPINN_TEST_TIER") == "unit"
SYSTEM_MODULES = {"test_slurm", "test_two_nodes", "test_wheel", "test_readme"}


def pytest_configure(config):
    config.addinivalue_line("markers", "system: Slurm, two nodes, the wheel, the README (make test)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in SYSTEM_MODULES:
            item.add_marker(pytest.mark.system)


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
        pytest.fail(f"hung: {' '.join(cmd)} still running after {timeout} s\n{e.stdout}\n{e.stderr}")
    return Run(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0, time.time())


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
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
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
            mapped |= {Path(line.split(None, 5)[5].strip()) for line in maps.read_text().splitlines()
                       if "/dev/shm/" in line and len(line.split(None, 5)) == 6}
        except OSError:
            continue
    return mapped


@pytest.fixture(scope="session", autouse=True)
def shared_memory_left_as_found():
    """MPICH leaves its shared-memory segment (/dev/shm/mpich_shm_*, ~3 MB of RAM) behind when a
    job ends by MPI_Abort or SIGKILL, which the fault tests do on purpose. At the end of the
    session the segments that appeared during it and that no process maps are removed."""
    before = mpich_segments()
    yield
    for segment in mpich_segments() - before - mapped_segments():
        segment.unlink(missing_ok=True)


def hydra_topology_files():
    return set(Path("/tmp").glob("hydra_hwloc_xmlfile_*"))


def hydra_running():
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().startswith(("mpiexec", "hydra")):
                return True
        except OSError:
            continue
    return False


@pytest.fixture(scope="session", autouse=True)
def hydra_files_left_as_found():
    """MPICH's launcher writes its topology to /tmp/hydra_hwloc_xmlfile_* and removes it on a
    clean exit, not when a test kills it (the fault and signal tests, about ten a session). At
    the end of the session the files that appeared during it are removed, unless some launcher
    (perhaps another user's) is still running and might read one."""
    before = hydra_topology_files()
    yield
    deadline = time.time() + 5  # a killed job's launcher may still be exiting
    while hydra_running() and time.time() < deadline:
        time.sleep(0.1)
    if not hydra_running():
        for leftover in hydra_topology_files() - before:
            leftover.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def numba_cache_warm():
    """Compile the kernels once before any multi-rank run, so ranks never race to write the cache
    and timing-sensitive tests measure running, not compiling."""
    from mpinn.model import Architecture, Network, init_params
    for loss, out_act in (("cross_entropy", "identity"), ("mse", "identity")):
        arch = Architecture((3, 4, 2), "relu", out_act, loss)
        net = Network(arch, init_params(arch, 0), 4)
        x = np.zeros((4, 3), np.float32)
        y = np.zeros(4, np.int64) if loss == "cross_entropy" else np.zeros((4, 2), np.float32)
        net.train_step(x, y, 0.25)
        net.loss_sums(x, y)
        net.forward(x)
    from mpinn.optim import Optimizer
    for name in ("sgd", "momentum", "adam"):
        Optimizer(name, arch.n_params, 0.1).step(net.params, net.grads)
