"""The sharded optimizer (--shard-optimizer, ZeRO stage 1): each data-parallel rank updates one
slice of the parameters and keeps that slice's optimizer state. It must train exactly what the
replicated update trains — momentum and Adam, 2 and 3 ranks, a parameter count no rank count
divides, clipping, the data-parallel groups of a pipeline — and its checkpoints must hold the full
state, so a run may resume sharded or not on any number of ranks."""
import numpy as np
import pytest

from helpers import ok, run_many, run_mpinn
from mpinn import checkpoint

NET = ["--hidden", "33,17", "--epochs", 2, "--shuffle", "global"]  # 64-33-17-10: 2,903 parameters


def load(path):
    return checkpoint.load(str(path / "checkpoint.h5"))


def assert_same(a, b, tol=1e-6):
    assert a.global_step == b.global_step and a.arch.n_params == 2903
    np.testing.assert_allclose(a.params, b.params, rtol=0, atol=tol)
    assert len(a.optimizer_state) == len(b.optimizer_state)
    for x, y in zip(a.optimizer_state, b.optimizer_state):
        np.testing.assert_allclose(x, y, rtol=0, atol=tol)


SHARDED = ("momentum", "adam", "lamb", "lars")
PIPELINE = ["--hidden", "33,17", "--epochs", 2, "--no-shuffle", "--optimizer", "adam",
            "--steps", 20, "--pipeline-stages", 2, "--clip-grad-norm", 0.5]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(case, "replicated" | "sharded") -> run folder; a case is (optimizer, ranks) or
    "pipeline". The trainings of one rank count run in one launch (helpers.run_many)."""
    root = tmp_path_factory.mktemp("trained")
    cases = {(optimizer, ranks): (ranks, [*NET, "--optimizer", optimizer, "--steps", 20])
             for optimizer in SHARDED for ranks in (2, 3)}
    cases["float64"] = (3, [*NET, "--optimizer", "adam", "--steps", 20, "--dtype", "float64"])
    cases["pipeline"] = (4, PIPELINE)
    cases["pipeline-lamb"] = (4, [*PIPELINE, "--optimizer", "lamb"])
    jobs = {}
    for case, (ranks, args) in cases.items():
        for update, flags in (("replicated", []), ("sharded", ["--shard-optimizer"])):
            run_dir = root / f"{case}-{update}"
            jobs[case, update] = (ranks, ["train", *args, *flags, "--run-dir", run_dir])
    runs = run_many(jobs, root)
    return {key: (ok(runs[key]), argv[-1])[1] for key, (_, argv) in jobs.items()}


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("optimizer", SHARDED)
def test_sharded_update_trains_what_the_replicated_one_trains(trained, ranks, optimizer):
    """LARS and LAMB: a weight matrix cut between blocks gets its norms summed over them."""
    case = (optimizer, ranks)
    assert_same(load(trained[case, "replicated"]), load(trained[case, "sharded"]))


def test_sharded_update_in_float64(trained):
    """--dtype float64: the blocks, their state and the gathers in float64; the same training to
    float64 rounding."""
    a, b = load(trained["float64", "replicated"]), load(trained["float64", "sharded"])
    assert a.params.dtype == b.params.dtype == b.optimizer_state[0].dtype == np.float64
    assert_same(a, b, tol=1e-12)


def test_sharded_pipeline_replicas_and_clipping(trained):
    """2 stages x 2 replicas: each stage's two replicas split its update; the clipping norm is
    summed from the slices across stages."""
    assert_same(load(trained["pipeline", "replicated"]), load(trained["pipeline", "sharded"]))
    assert_same(load(trained["pipeline-lamb", "replicated"]),
                load(trained["pipeline-lamb", "sharded"]))


def test_checkpoints_are_interchangeable_across_sharding_and_world_sizes(tmp_path):
    """Sharded on 2 ranks for 10 steps, resumed sharded on 3 ranks, then replicated on 1 rank:
    the weights and state of one replicated 2-rank run (the global shuffle's batches do not
    depend on the ranks; only the summation order does)."""
    args = [*NET, "--optimizer", "adam", "--clip-grad-norm", 0.5]
    ok(run_mpinn(2, "train", *args, "--steps", 20, "--run-dir", tmp_path / "straight"))
    ok(
        run_mpinn(
            2, "train", *args, "--steps", 10, "--shard-optimizer", "--run-dir", tmp_path / "r"
        )
    )
    ok(
        run_mpinn(
            3, "train", "--resume", "--steps", 15, "--shard-optimizer", "--run-dir", tmp_path / "r"
        )
    )
    ok(run_mpinn(1, "train", "--resume", "--steps", 20, "--run-dir", tmp_path / "r"))
    assert_same(load(tmp_path / "straight"), load(tmp_path / "r"))


def test_shard_with_overlap_is_refused(tmp_path):
    r = run_mpinn(2, "train", "--shard-optimizer", "--overlap-mb", 1, "--run-dir", tmp_path)
    assert r.returncode == 2 and "--shard-optimizer and --overlap-mb exclude each other" in r.stderr
