"""Pipeline mode over real MPI ranks: same parameters as 1-rank training for both schedules at
S = 2, 3, 4 and hybrid 2 x 2, no deadlock for M < S, M = 1 or a short last batch, checkpoints
interchangeable with data-parallel mode, forward-only evaluate and predict, clear errors."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import ok, run_many, run_mpinn, write_classification
from mpinn import checkpoint

# 203 rows, global batch 24: the last batch has 11 rows; 4 layers, so up to 4 stages.
N, BATCH, EPOCHS = 203, 24, 2
COMMON = ["--hidden", "16,12,8", "--activation", "tanh", "--optimizer", "momentum", "--lr", "0.05",
          "--batch-size", BATCH, "--epochs", EPOCHS, "--no-shuffle", "--check-every", 1,
          "--log-every", 5]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_classification(tmp_path_factory.mktemp("d") / "train.h5", N, 6, 4, seed=5)


LAYOUTS = [
    (2, 2, 3, "gpipe", 1 / 4), (2, 2, 3, "1f1b", 1 / 4),
    (3, 3, 3, "gpipe", 2 / 5), (3, 3, 5, "1f1b", 2 / 7),
    (4, 4, 2, "gpipe", 3 / 5),   # M < S
    (4, 4, 1, "1f1b", 3 / 4),    # M = 1
    (4, 4, 8, "1f1b", 3 / 11),
    (4, 2, 3, "gpipe", 1 / 4), (4, 2, 3, "1f1b", 1 / 4),  # hybrid: 2 stages x 2 replicas
]
# 2 stages, 6 micro-batches, for the activations each schedule holds
HOLDING = {kind: (2, 2, 6, kind) for kind in ("gpipe", "1f1b")}


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """(ranks, stages, micro-batches, schedule) -> (run, run folder); (1,) is the 1-rank
    baseline. The trainings of one rank count run in one launch (helpers.run_many)."""
    root = tmp_path_factory.mktemp("trained")
    keys = [(1,)] + [layout[:4] for layout in LAYOUTS] + list(HOLDING.values())
    jobs = {}
    for key in dict.fromkeys(keys):
        stages = ([] if key == (1,) else ["--pipeline-stages", key[1], "--micro-batches", key[2],
                                          "--schedule", key[3]])
        jobs[key] = (key[0], ["train", "--data", dataset, "--run-dir",
                              root / "-".join(map(str, key)), *COMMON, *stages])
    runs = run_many(jobs, root)
    return {key: (ok(runs[key]), Path(argv[4])) for key, (_, argv) in jobs.items()}


@pytest.fixture(scope="module")
def baseline(trained):
    return checkpoint.load(str(trained[1,][1] / "checkpoint.h5"))


@pytest.mark.parametrize("ranks,stages,micro,kind,bubble", LAYOUTS)
def test_pipeline_matches_one_rank(trained, baseline, ranks, stages, micro, kind, bubble):
    r, run_dir = trained[ranks, stages, micro, kind]
    ckpt = checkpoint.load(str(run_dir / "checkpoint.h5"))
    assert ckpt.arch == baseline.arch and ckpt.global_step == baseline.global_step
    np.testing.assert_allclose(ckpt.params, baseline.params, rtol=1e-4, atol=1e-6)
    for mine, base in zip(ckpt.optimizer_state, baseline.optimizer_state):
        np.testing.assert_allclose(mine, base, rtol=1e-4, atol=1e-6)
    summary = [json.loads(l) for l in open(run_dir / "metrics.jsonl")][-1]
    assert summary["kind"] == "summary" and summary["samples"] == EPOCHS * N
    assert [s["stage"] for s in summary["stages"]] == list(range(stages))
    assert sum(s["layers"] for s in summary["stages"]) == 4
    assert summary["ideal_bubble"] == pytest.approx(bubble)  # (S-1)/(M+S-1), worked by hand
    assert all(0 <= s["bubble"] <= 1 and s["compute_s"] > 0 for s in summary["stages"])
    assert f"{stages} pipeline stages" in r.stdout


def test_1f1b_holds_fewer_activations_than_gpipe(trained):
    peak = {}
    for kind in ("gpipe", "1f1b"):
        run_dir = trained[HOLDING[kind]][1]
        stages = [json.loads(l) for l in open(run_dir / "metrics.jsonl")][-1]["stages"]
        peak[kind] = [s["activation_bytes"] for s in stages]
    # stage 0 keeps 2 (= S) micro-batches under 1F1B instead of 6
    assert peak["1f1b"][0] * 2 < peak["gpipe"][0]
    assert peak["1f1b"][1] < peak["gpipe"][1]


def test_checkpoint_round_trip_pipeline_data_parallel_pipeline(dataset, baseline, tmp_path):
    """Epoch 1 on 2 stages, epoch 2 resumed data parallel on 3 ranks, then 1 more epoch on 4
    stages: with file order the result equals 3 straight epochs on 1 rank."""
    args = [a for a in COMMON]
    epochs_at = args.index("--epochs") + 1
    args[epochs_at] = 1
    ok(run_mpinn(2, "train", "--data", dataset, "--run-dir", tmp_path, *args,
                 "--pipeline-stages", 2))
    args[epochs_at] = 2
    ok(run_mpinn(3, "train", "--data", dataset, "--run-dir", tmp_path, *args, "--resume"))
    after_two = checkpoint.load(str(tmp_path / "checkpoint.h5"))
    np.testing.assert_allclose(after_two.params, baseline.params, rtol=1e-4, atol=1e-6)
    args[epochs_at] = 3
    ok(run_mpinn(4, "train", "--data", dataset, "--run-dir", tmp_path, *args, "--resume",
                 "--pipeline-stages", 4, "--micro-batches", 2))
    ok(run_mpinn(1, "train", "--data", dataset, "--run-dir", tmp_path / "straight", *args))
    three = checkpoint.load(str(tmp_path / "checkpoint.h5"))
    straight = checkpoint.load(str(tmp_path / "straight" / "checkpoint.h5"))
    assert three.global_step == straight.global_step == 3 * 9
    np.testing.assert_allclose(three.params, straight.params, rtol=1e-4, atol=1e-6)


def test_evaluate_and_predict_in_pipeline_mode(dataset, baseline, tmp_path):
    ckpt = tmp_path / "c.h5"
    checkpoint.save(str(ckpt), baseline)
    dp = json.loads(ok(run_mpinn(1, "evaluate", "--checkpoint", ckpt, "--data", dataset,
                                 "--json")).stdout)
    for ranks, stages in ((2, 2), (4, 4), (4, 2)):
        pp = json.loads(ok(run_mpinn(ranks, "evaluate", "--checkpoint", ckpt, "--data", dataset,
                                     "--json", "--pipeline-stages", stages, "--batch-size",
                                     17)).stdout)
        assert pp["samples"] == dp["samples"] == N and pp["pipeline_stages"] == stages
        assert pp["accuracy"] == dp["accuracy"]
        assert pp["loss"] == pytest.approx(dp["loss"], rel=1e-5)
    ok(run_mpinn(1, "predict", "--checkpoint", ckpt, "--data", dataset, "--out", tmp_path / "a.h5"))
    ok(run_mpinn(3, "predict", "--checkpoint", ckpt, "--data", dataset, "--out", tmp_path / "b.h5",
                 "--pipeline-stages", 3, "--batch-size", 50))
    with h5py.File(tmp_path / "a.h5", "r") as a, h5py.File(tmp_path / "b.h5", "r") as b:
        np.testing.assert_array_equal(a["pred"][...], b["pred"][...])
        np.testing.assert_allclose(a["prob"][...], b["prob"][...], rtol=1e-5, atol=1e-7)


BAD_STAGES = [
    (5, ["--pipeline-stages", 5], "--pipeline-stages 5 exceeds the network's 4 layers"),
    (3, ["--pipeline-stages", 2], "--pipeline-stages 2 does not divide the 3 ranks"),
    (2, ["--pipeline-stages", 2, "--partition", "3,2"], "--partition 3,2 must give 2 positive"),
    (1, ["--micro-batches", 0], "--micro-batches must be positive"),
    (2, ["--pipeline-stages", 2, "--shuffle", "global"], "--shuffle global works in data-parallel"),
]


@pytest.fixture(scope="module")
def bad_stage_runs(dataset, tmp_path_factory):
    """Every case of BAD_STAGES, one launch per rank count (helpers.run_many)."""
    root = tmp_path_factory.mktemp("stages")
    jobs = {}
    for i, (ranks, args, _) in enumerate(BAD_STAGES):
        (root / str(i)).mkdir()
        jobs[i] = (ranks, ["train", "--data", dataset, "--run-dir", root / str(i), *COMMON, *args])
    return run_many(jobs, root / "many")


@pytest.mark.parametrize("case", range(len(BAD_STAGES)), ids=[m for _, _, m in BAD_STAGES])
def test_invalid_stage_settings(bad_stage_runs, case):
    r, message = bad_stage_runs[case], BAD_STAGES[case][2]
    lines = [l for l in r.stderr.splitlines() if l.startswith("mpinn: error")]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert "rank" not in lines[0].split(":")[1]  # every rank saw it: no rank named
