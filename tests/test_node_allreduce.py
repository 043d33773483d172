"""The node shared-memory sum (comm.NodeAllreduce, `--allreduce auto`): ranks that share a node
write their gradients into slots of one shared window and read the sum where it lies. It must sum
exactly what MPI's Allreduce sums, step after step, at 2, 3 and 4 ranks and for lengths that are
not multiples of its 64-byte slices, and train what `--allreduce mpi` trains."""
import itertools
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import mpiexec, mpinn_env, ok, run_many, run_mpinn
from mpinn import checkpoint
from mpinn.data_parallel import NODE_SHARD_BYTES

PROGRAM = textwrap.dedent("""
    import sys
    import numpy as np
    from mpinn.comm import Comm
    comm = Comm()
    # a failed check on one rank ends the job at once (the others would wait in a collective)
    sys.excepthook = lambda *error: (sys.__excepthook__(*error), comm.abort(1))
    n, sliced = int(sys.argv[1]), sys.argv[2] == "sliced"
    node_sum = comm.node_allreduce(n, shared_params=sliced)
    assert node_sum is not None and node_sum.sliced is sliced
    def mine(step):
        return np.random.default_rng([step, comm.rank]).normal(size=n).astype(np.float32)

    sums = []
    for step in range(8):  # nothing between the sums but the node's own fences
        node_sum.slot[:] = mine(step)  # right after the last sum: a rank ahead must not spoil it
        sums.append(node_sum.sum_().copy())
    for step, got in enumerate(sums):
        want = comm.allreduce_(mine(step))
        # the same float32 additions in another order: equal to rounding
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        everyone = np.zeros((comm.size, n), np.float32)
        everyone[comm.rank] = got
        comm.allreduce_(everyone)
        assert (everyone == everyone[0]).all()  # every rank reads the very same sum
    node_sum.close()
    ranks_ok = comm.allreduce_(np.ones(1))[0]  # any rank's failed assertion ends the job
    if comm.rank == 0:
        print("ok", int(ranks_ok))
""")


@pytest.mark.parametrize("layout", ["whole", "sliced"])
@pytest.mark.parametrize("ranks", [2, 3, 4], ids=lambda k: f"{k}ranks")
@pytest.mark.parametrize("n", [1, 17, 1000, 100_003], ids=lambda n: f"n{n}")
def test_node_sum_equals_mpi_allreduce(tmp_path, ranks, n, layout):
    (tmp_path / "prog.py").write_text(PROGRAM)
    r = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, str(tmp_path / "prog.py"),
                        str(n), layout], capture_output=True, text=True, timeout=120,
                       env=mpinn_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ok {ranks}"


@pytest.mark.parametrize("layout", ["whole", "sliced"])
@pytest.mark.parametrize("ranks", [2, 3], ids=lambda k: f"{k}ranks")
def test_node_sum_with_a_slow_reader_equals_mpi_allreduce(tmp_path, ranks, layout):
    """Rank 1 sleeps after every fence before it reads the slots (MPINN_TEST_SLOW_RANK): a rank
    that runs ahead writes its next values meanwhile, which only the second set of slots keeps
    from what rank 1 still reads. Without the pause that overwrite happened only when the
    scheduler delayed a reader there (the one-set mutant survived twice at 2 ranks)."""
    (tmp_path / "prog.py").write_text(PROGRAM)
    r = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, str(tmp_path / "prog.py"),
                        "100003", layout], capture_output=True, text=True, timeout=120,
                       env=mpinn_env({"MPINN_TEST_SLOW_RANK": "1:0.02"}))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ok {ranks}"


def test_node_sharded_training_with_a_slow_rank_equals_mpi_allreduce(tmp_path):
    """The node-sharded update's fences (after publishing the slice's checks, after updating the
    slice) keep a rank that runs ahead from reading stale totals or parameters: rank 1 pauses
    before each, and the run still trains what MPI's Allreduce trains."""
    args = ["--hidden", "512,128", "--epochs", 2, "--steps", 12, "--clip-grad-norm", "0.05",
            "--optimizer", "adam"]
    ok(run_mpinn(3, "train", *args, "--allreduce", "mpi", "--run-dir", tmp_path / "mpi"))
    shm = ok(run_mpinn(3, "train", *args, "--run-dir", tmp_path / "shm",
                       env={"MPINN_TEST_SLOW_RANK": "1:0.02"}))
    assert "the update split among a node's ranks" in shm.stdout
    a = checkpoint.load(str(tmp_path / "mpi" / "checkpoint.h5"))
    b = checkpoint.load(str(tmp_path / "shm" / "checkpoint.h5"))
    np.testing.assert_allclose(b.params, a.params, rtol=0, atol=1e-6)


EXTRAS = {"momentum": [], "clipped_adam": ["--clip-grad-norm", "0.05", "--optimizer", "adam"],
          "lamb": ["--optimizer", "lamb", "--weight-decay", "0.01"],  # norms summed over slices
          "lars": ["--optimizer", "lars", "--lr", "1", "--weight-decay", "0.0005"],
          "float64": ["--optimizer", "adam", "--dtype", "float64"]}  # the window in float64
UPDATES = {"replicated_update": ("33,17", False), "node_sharded_update": ("512,128", True)}
SUMS = {"mpi": ["--allreduce", "mpi"], "shm": []}


def training_jobs(root, steps, ranks, *resume):
    jobs = {}
    for extra, update, total in itertools.product(EXTRAS, UPDATES, SUMS):
        args = ["--hidden", UPDATES[update][0], "--epochs", 2, "--shuffle", "global",
                *EXTRAS[extra], "--steps", steps, *SUMS[total], *resume]
        jobs[extra, update, total] = (ranks, ["train", *args, "--run-dir",
                                              root / "-".join((extra, update, total))])
    return jobs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(extra, update, sum) -> (the first run, its checkpoint after 20 steps on 3 ranks, the
    checkpoint once resumed to 30 steps on 2 ranks). Each stage's trainings run in one launch
    (helpers.run_many)."""
    root = tmp_path_factory.mktemp("trained")
    first = run_many(training_jobs(root, 20, 3), root)
    after_20 = {}
    for key, run in first.items():
        ok(run)
        after_20[key] = root / ("-".join(key) + "-20.h5")
        shutil.copy(root / "-".join(key) / "checkpoint.h5", after_20[key])
    resumed = run_many(training_jobs(root, 30, 2, "--resume"), root)
    return {key: (run, after_20[key], ok(resumed[key]) and root / "-".join(key) / "checkpoint.h5")
            for key, run in first.items()}


@pytest.mark.parametrize("extra", list(EXTRAS))
@pytest.mark.parametrize("update", list(UPDATES))
def test_training_through_shared_memory_equals_mpi_allreduce(trained, extra, update):
    """2,903 parameters: every rank updates all of them from the shared sum; 100,234 (over
    NODE_SHARD_BYTES): the node's ranks share one copy and each updates its slice. Both train
    what MPI's Allreduce and a replicated update train, and checkpoint the full state."""
    shared_params = UPDATES[update][1]
    (mpi, mpi_20, mpi_30), (shm, shm_20, shm_30) = (trained[extra, update, total]
                                                    for total in ("mpi", "shm"))
    said = "data parallel (gradients summed in each node's shared memory" + (
        ", the update split among a node's ranks)" if shared_params else ")")
    assert said in shm.stdout and "data parallel, network" in mpi.stdout
    a, b = checkpoint.load(str(mpi_20)), checkpoint.load(str(shm_20))
    assert a.global_step == b.global_step == 20
    assert b.params.dtype == (np.float64 if extra == "float64" else np.float32)
    assert (b.arch.n_params * 4 >= NODE_SHARD_BYTES) is shared_params
    np.testing.assert_allclose(b.params, a.params, rtol=0, atol=1e-6)
    for x, y in zip(b.optimizer_state, a.optimizer_state):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    # the full state: resumed on 2 ranks either way, the same run continues
    a, b = checkpoint.load(str(mpi_30)), checkpoint.load(str(shm_30))
    np.testing.assert_allclose(b.params, a.params, rtol=0, atol=1e-6)


def test_bench_says_which_sum_ran():
    for flag, shared in (("auto", True), ("mpi", False)):
        r = ok(run_mpinn(2, "bench", "--features", 16, "--hidden", "16", "--batch-per-rank", 8,
                         "--steps", 3, "--warmup", 1, "--allreduce", flag, "--json",
                         "--allreduce-sweep", "--sweep-max", 4096))
        result = json.loads(r.stdout)
        assert result["node_shared_memory"] is shared
        assert [p["bytes"] for p in result["allreduce_sweep"]] == [4, 16, 64, 256, 1024, 4096]


def test_no_room_in_dev_shm_falls_back_to_mpi(tmp_path):
    """Where /dev/shm lacks room for the window (a container's 64 MB) on any rank, every rank
    takes MPI's Allreduce: the ranks agree, none waits in a window the others never made."""
    (tmp_path / "prog.py").write_text(textwrap.dedent("""
        import mpinn.comm.node
        from mpinn.comm import Comm
        comm = Comm()
        if comm.rank == 1:
            mpinn.comm.node.shm_free_bytes = lambda: 0  # one rank short of room is enough
        assert comm.node_allreduce(1000) is None
        mpinn.comm.node.shm_free_bytes = lambda: 1 << 40
        node_sum = comm.node_allreduce(1000)
        assert node_sum is not None
        node_sum.close()
        if comm.rank == 0:
            print("ok")
    """))
    r = subprocess.run([mpiexec(), "-n", "2", sys.executable, str(tmp_path / "prog.py")],
                       capture_output=True, text=True, timeout=120, env=mpinn_env())
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
