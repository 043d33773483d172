"""The node shared-memory sum (comm.NodeAllreduce, `--allreduce auto`): ranks that share a node
write their gradients into slots of one shared window and read the sum where it lies. It must sum
exactly what MPI's Allreduce sums, step after step, at 2, 3 and 4 ranks and for lengths that are
not multiples of its 64-byte slices, and train what `--allreduce mpi` trains."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import mpiexec, mpinn_env, ok, run_mpinn
from mpinn import checkpoint

PROGRAM = textwrap.dedent("""
    import sys
    import numpy as np
    from mpinn.comm import Comm
    comm = Comm()
    n = int(sys.argv[1])
    node_sum = comm.node_allreduce(n)
    assert node_sum is not None
    for step in range(5):
        rng = np.random.default_rng([step, comm.rank])
        mine = rng.normal(size=n).astype(np.float32)
        node_sum.slot[:] = mine
        got = node_sum.sum_().copy()
        want = comm.allreduce_(mine.copy())
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


@pytest.mark.parametrize("ranks", [2, 3, 4], ids=lambda k: f"{k}ranks")
@pytest.mark.parametrize("n", [1, 17, 1000, 100_003], ids=lambda n: f"n{n}")
def test_node_sum_equals_mpi_allreduce(tmp_path, ranks, n):
    (tmp_path / "prog.py").write_text(PROGRAM)
    r = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, str(tmp_path / "prog.py"),
                        str(n)], capture_output=True, text=True, timeout=120, env=mpinn_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ok {ranks}"


@pytest.mark.parametrize("extra", [[], ["--clip-grad-norm", "0.05", "--optimizer", "adam"]],
                         ids=["momentum", "clipped_adam"])
def test_training_through_shared_memory_equals_mpi_allreduce(tmp_path, extra):
    args = ["--hidden", "33,17", "--epochs", 2, "--shuffle", "global", "--steps", 20, *extra]
    ok(run_mpinn(3, "train", *args, "--allreduce", "mpi", "--run-dir", tmp_path / "mpi"))
    ok(run_mpinn(3, "train", *args, "--run-dir", tmp_path / "shm"))
    a = checkpoint.load(str(tmp_path / "mpi" / "checkpoint.h5"))
    b = checkpoint.load(str(tmp_path / "shm" / "checkpoint.h5"))
    assert a.global_step == b.global_step == 20
    np.testing.assert_allclose(b.params, a.params, rtol=0, atol=1e-6)


def test_bench_says_which_sum_ran():
    for flag, shared in (("auto", True), ("mpi", False)):
        r = ok(run_mpinn(2, "bench", "--features", 16, "--hidden", "16", "--batch-per-rank", 8,
                         "--steps", 3, "--warmup", 1, "--allreduce", flag, "--json",
                         "--allreduce-sweep", "--sweep-max", 4096))
        result = json.loads(r.stdout)
        assert result["node_shared_memory"] is shared
        assert [p["bytes"] for p in result["allreduce_sweep"]] == [4, 16, 64, 256, 1024, 4096]
