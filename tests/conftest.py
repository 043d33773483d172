"""pytest's hooks and the session's fixtures (the helpers tests import live in helpers.py).

The suite leaves the machine as it found it: Numba's compile cache and Hypothesis's example
database live in a temporary folder for the session (set before mpinn or numba is imported, and
inherited by every mpiexec child), removed at the end."""
import atexit
import inspect
import os
import shutil
import tempfile
import time
from pathlib import Path

# pytest-xdist's workers (make test runs two, each taking whole files) share the scratch folder
# of the process that started them, and so one Numba cache: the process that made it removes it.
_SCRATCH = os.environ.get("MPINN_TEST_SCRATCH")
if _SCRATCH is None:
    _SCRATCH = os.environ["MPINN_TEST_SCRATCH"] = tempfile.mkdtemp(prefix="mpinn-tests-")
    atexit.register(shutil.rmtree, _SCRATCH, True)
# The unit tier (make test-fast, the inner loop) may keep its compiled kernels between runs in the
# folder MPINN_TEST_NUMBA_CACHE names: Numba recompiles a kernel whose source file changed. The
# whole suite always starts from an empty cache (it checks cold starts, and ranks share it).
_KEPT = os.environ.get("MPINN_TEST_NUMBA_CACHE") if os.environ.get("MPINN_TEST_TIER") == "unit" \
    else None
os.environ["NUMBA_CACHE_DIR"] = _KEPT or os.path.join(_SCRATCH, "numba-cache")
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = os.path.join(_SCRATCH, "hypothesis")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import UNIT_TIER, mapped_segments, mpich_segments  # noqa: E402

# Tiers: unit (no process launched through mpiexec), mpi (real `mpiexec -n K` runs), system
# (Slurm, two nodes, the wheel, the README's commands). `make test` runs them all; `make
# test-fast` (MPINN_TEST_TIER=unit, -m "not system") skips a test where it would launch mpiexec.
SYSTEM_MODULES = {"test_slurm", "test_two_nodes", "test_wheel", "test_readme"}


LAUNCHES = ("run_mpinn(", "start_mpinn(", "mpinn_command(", "mpiexec(")
IN_WORKER = "PYTEST_XDIST_WORKER" in os.environ  # a pytest-xdist worker, not the suite's process
FOUND = pytest.StashKey()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "system: Slurm, two nodes, the wheel, the README (make test)"
    )
    config.addinivalue_line("markers", "mpi: launches real `mpiexec -n K` runs (make test)")
    if not IN_WORKER:  # what was there before the suite: left alone at the end
        config.stash[FOUND] = (mpich_segments(), hydra_topology_files())


def pytest_unconfigure(config):
    """The leftovers of the session's killed jobs go once every test has ended: in the process
    that started the suite, never in a pytest-xdist worker while the other worker's jobs run (a
    segment being created is not yet mapped, and would look left over)."""
    if not IN_WORKER and FOUND in config.stash:
        segments, topology = config.stash[FOUND]
        remove_shared_memory_left(segments)
        remove_hydra_files_left(topology)


# The files that take longest while running few tests start first: pytest-xdist hands out whole
# files in collection order (make test passes --no-loadscope-reorder; its own order puts files
# with fewer tests last), and these, mostly waiting on Slurm, a shaped link or pip, ended the
# suite on one worker while the other had nothing left (about 2 minutes at 849 tests).
RUN_FIRST = ("test_slurm", "test_two_nodes", "test_readme", "test_wheel")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in SYSTEM_MODULES:
            item.add_marker(pytest.mark.system)
        elif launches_mpi(item):
            item.add_marker(pytest.mark.mpi)
    items[:] = sorted(items, key=run_order(items))


def run_order(items):
    """The sort key of a test: the RUN_FIRST files in that order, then files by how many tests
    they hold, most first (xdist's own order), a file's tests as collected."""
    per_file = {}
    for item in items:
        per_file[item.module.__name__] = per_file.get(item.module.__name__, 0) + 1
    def key(item):
        name = item.module.__name__
        first = RUN_FIRST.index(name) if name in RUN_FIRST else len(RUN_FIRST)
        return first, -per_file[name], name
    return key


def launches_mpi(item):
    """Whether a test's own code starts mpiexec (what -m mpi selects; a test that starts it
    through a helper of its module is still skipped by the unit tier where it launches)."""
    try:
        source = inspect.getsource(item.function)
    except (OSError, TypeError):
        return False
    return any(call in source for call in LAUNCHES)


def remove_shared_memory_left(before):
    """MPICH leaves its shared-memory segment (/dev/shm/mpich_shm_*, ~3 MB of RAM) behind when a
    job ends by MPI_Abort or SIGKILL, which the fault tests do on purpose: the segments that
    appeared during the session and that no process maps are removed."""
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


def remove_hydra_files_left(before):
    """MPICH's launcher writes its topology to /tmp/hydra_hwloc_xmlfile_* and removes it on a
    clean exit, not when a test kills it (the fault and signal tests, about ten a session): the
    files that appeared during the session are removed, unless some launcher (perhaps another
    user's) is still running and might read one."""
    deadline = time.time() + 5  # a killed job's launcher may still be exiting
    while hydra_running() and time.time() < deadline:
        time.sleep(0.1)
    if not hydra_running():
        for leftover in hydra_topology_files() - before:
            leftover.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def numba_cache_warm():
    """Compile the kernels once before any multi-rank run, so ranks never race to write the cache
    and timing-sensitive tests measure running, not compiling. The unit tier launches no ranks:
    each kernel compiles when a test first calls it."""
    if UNIT_TIER:
        return
    from mpinn.model import Architecture, Network, init_params
    for loss, out_act in (("cross_entropy", "identity"), ("mse", "identity")):
        arch = Architecture((3, 4, 2), "relu", out_act, loss)
        net = Network(arch, init_params(arch, 0), 4)
        x = np.zeros((4, 3), np.float32)
        y = np.zeros(4, np.int64) if loss == "cross_entropy" else np.zeros((4, 2), np.float32)
        net.train_step(x, y, 0.25)
        net.loss_sums(x, y)
        net.forward(x)
    from mpinn.optim import OPTIMIZERS, Optimizer
    for name in OPTIMIZERS:
        Optimizer(name, arch.n_params, 0.1).step(net.params, net.grads)
