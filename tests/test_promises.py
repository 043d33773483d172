"""Behaviour the docs promise that no other test pins down: the signal grace period and a second
signal, --seed, --x-key/--y-key, --threads > 1, the global shuffle at 3 ranks and across a resume,
pipeline mode with --partition and with a fault, and a multi-rank start from a cold Numba cache."""
import os
import signal
import time

import h5py
import numpy as np
import pytest

from helpers import finish, ok, run_mpinn, start_mpinn, write_classification
from mpinn import checkpoint

N, BATCH = 203, 24
COMMON = ["--hidden", "16,12,8", "--activation", "tanh", "--optimizer", "momentum", "--lr", "0.05",
          "--batch-size", BATCH, "--log-every", 50]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_classification(tmp_path_factory.mktemp("p") / "d.h5", N, 6, 4, seed=7)


def params(run_dir):
    return checkpoint.load(str(run_dir / "checkpoint.h5")).params


def errors(run):
    return [l for l in run.stderr.splitlines() if l.startswith("mpinn: error")]


def wait_for_start(run_dir, timeout=60):
    """Until the job has written its first metrics (the loop is running)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.1)


@pytest.mark.parametrize("second_signal", [False, True])
def test_signal_grace_and_second_signal(tmp_path, second_signal):
    """Rank 0 hangs inside a step, so no final checkpoint can come: after SIGTERM the job exits
    143 when --signal-grace (2 s) runs out, or at once on a second SIGTERM (grace left at 30 s)."""
    grace = [] if second_signal else ["--signal-grace", 2]
    proc = start_mpinn(2, "train", "--run-dir", tmp_path, "--epochs", 3, "--log-every", 1,
                       "--stall-warning", 0, *grace, env={"MPINN_FAULT": "hang:rank=0:step=5"})
    wait_for_start(tmp_path)
    time.sleep(1.0)  # now rank 0 sleeps in step 5
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    if second_signal:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
    r = finish(proc, timeout=60)
    assert r.returncode == 143, r.stderr
    took = r.ended - sent
    if second_signal:
        assert took < 20, took  # far less than the 30 s grace: the second signal ended it
        assert "grace period" not in r.stderr
    else:
        assert 2 <= took < 20, took
        assert "no final checkpoint within the 2 s grace period after the signal" in r.stderr


def test_seed_sets_initialisation_and_shuffle(dataset, tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        ok(run_mpinn(2, "train", "--data", dataset, "--run-dir", tmp_path / name, *COMMON,
                     "--epochs", 1, "--seed", seed))
    np.testing.assert_array_equal(params(tmp_path / "a"), params(tmp_path / "b"))
    assert not np.allclose(params(tmp_path / "a"), params(tmp_path / "c"), atol=1e-3)
    assert checkpoint.load(str(tmp_path / "c" / "checkpoint.h5")).seed == 6


def test_x_key_and_y_key_name_the_datasets(dataset, tmp_path):
    renamed = tmp_path / "renamed.h5"
    with h5py.File(dataset, "r") as src, h5py.File(renamed, "w") as dst:
        dst["inputs"], dst["labels"], dst["X"] = src["X"][...], src["y"][...], src["X"][...] * 0
    ok(run_mpinn(2, "train", "--data", dataset, "--run-dir", tmp_path / "a", *COMMON,
                 "--epochs", 1))
    ok(run_mpinn(2, "train", "--data", renamed, "--x-key", "inputs", "--y-key", "labels",
                 "--val-data", renamed, "--run-dir", tmp_path / "b", *COMMON, "--epochs", 1))
    np.testing.assert_array_equal(params(tmp_path / "a"), params(tmp_path / "b"))


def test_more_threads_per_rank_train_the_same(dataset, tmp_path):
    """BLAS with 2 threads may sum in another order: the same weights to float32 rounding."""
    for threads in (1, 2):
        ok(run_mpinn(1, "train", "--data", dataset, "--run-dir", tmp_path / str(threads),
                     *COMMON, "--hidden", "256,64", "--epochs", 2, "--threads", threads))
    np.testing.assert_allclose(params(tmp_path / "2"), params(tmp_path / "1"), rtol=1e-4,
                               atol=1e-6)
    r = ok(run_mpinn(2, "train", "--data", dataset, "--run-dir", tmp_path / "over", *COMMON,
                     "--epochs", 1, "--threads", os.cpu_count()))
    assert f"2 ranks x {os.cpu_count()} thread(s) on this node exceed" in r.stderr


def test_global_shuffle_at_3_ranks_and_across_a_resume(dataset, tmp_path):
    args = ["--data", dataset, *COMMON, "--shuffle", "global"]
    ok(run_mpinn(1, "train", *args, "--epochs", 3, "--run-dir", tmp_path / "one"))
    ok(run_mpinn(3, "train", *args, "--epochs", 3, "--run-dir", tmp_path / "three"))
    ok(run_mpinn(3, "train", *args, "--epochs", 3, "--steps", 13, "--run-dir", tmp_path / "res"))
    ok(run_mpinn(2, "train", *args, "--epochs", 3, "--resume", "--run-dir", tmp_path / "res"))
    one = params(tmp_path / "one")
    np.testing.assert_allclose(params(tmp_path / "three"), one, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params(tmp_path / "res"), one, rtol=1e-4, atol=1e-6)


def test_pipeline_with_a_partition_and_relu(dataset, tmp_path):
    args = ["--data", dataset, *COMMON, "--activation", "relu", "--no-shuffle", "--epochs", 2]
    ok(run_mpinn(1, "train", *args, "--run-dir", tmp_path / "one"))
    r = ok(run_mpinn(3, "train", *args, "--run-dir", tmp_path / "pipe", "--pipeline-stages", 3,
                     "--partition", "2,1,1", "--micro-batches", 3))
    assert "layers [2, 1, 1]" in r.stdout
    np.testing.assert_allclose(params(tmp_path / "pipe"), params(tmp_path / "one"), rtol=1e-4,
                               atol=1e-6)


def test_pipeline_fault_ends_every_rank(dataset, tmp_path):
    r = run_mpinn(3, "train", "--data", dataset, *COMMON, "--epochs", 2, "--run-dir", tmp_path,
                  "--pipeline-stages", 3, env={"MPINN_FAULT": "raise:rank=1:step=4"}, timeout=60)
    assert r.returncode == 1
    (line,) = errors(r)
    assert line.startswith("mpinn: error on rank 1 of 3: RuntimeError: injected fault at step, "
                           "step 4 ")


def test_cold_cache_start_on_two_ranks(dataset, tmp_path):
    """An empty Numba cache: the first rank on the node compiles and fills it, the other loads it
    after a barrier; training is unchanged and the cache now holds every kernel's index."""
    cache = tmp_path / "cache"
    r = ok(run_mpinn(2, "train", "--data", dataset, "--run-dir", tmp_path / "cold", *COMMON,
                     "--epochs", 1, "--no-shuffle", env={"NUMBA_CACHE_DIR": str(cache)},
                     timeout=240))
    assert "kernels ready in" in r.stdout and not errors(r)
    indexes = {p.name.split("-")[0] for p in cache.rglob("*.nbi")}
    for kernel in ("kernels.train_step_ce", "kernels.cross_entropy_grad_", "optim.momentum_"):
        assert kernel in indexes, sorted(indexes)
    ok(run_mpinn(2, "train", "--data", dataset, "--run-dir", tmp_path / "warm", *COMMON,
                 "--epochs", 1, "--no-shuffle", env={"NUMBA_CACHE_DIR": str(cache)}))
    np.testing.assert_array_equal(params(tmp_path / "cold"), params(tmp_path / "warm"))
