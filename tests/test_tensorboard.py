"""--tensorboard DIR: rank 0 writes the metrics records as TensorBoard scalars (tensorboardX),
read back here by TensorBoard's own event reader and compared with metrics.jsonl."""
import json
import os

import numpy as np
import pytest

from helpers import ok, run_mpinn, steps_per_epoch

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")


def scalars(folder):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_are_the_metrics_records_and_a_resume_continues_them(tmp_path):
    args = ["train", "--hidden", "16", "--log-every", 5, "--tensorboard", tmp_path / "tb",
            "--run-dir", tmp_path / "r"]
    ok(run_mpinn(2, *args, "--epochs", 2))
    ok(run_mpinn(2, *args, "--epochs", 3, "--resume"))
    assert len(os.listdir(tmp_path / "tb")) == 2  # one event file per run, rank 0's only
    got = scalars(tmp_path / "tb")
    records = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    for kind, keys in (("train", ("loss", "accuracy", "samples_per_s", "step_s", "lr")),
                       ("epoch", ("val_loss", "val_accuracy"))):
        mine = [r for r in records if r["kind"] == kind]
        for key in keys:
            steps, values = zip(*got[f"{kind}/{key}"])
            assert list(steps) == [r["step"] for r in mine], key
            np.testing.assert_allclose(values, [r[key] for r in mine], rtol=1e-6, err_msg=key)
    assert [s for s, _ in got["epoch/val_loss"]] == [steps_per_epoch() * e for e in (1, 2, 3)]


def test_without_tensorboardx_the_option_is_one_clear_error(tmp_path):
    fake = tmp_path / "fake" / "tensorboardX"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed here')\n")
    path = os.pathsep.join(p for p in (str(fake.parent), os.environ.get("PYTHONPATH")) if p)
    r = run_mpinn(2, "train", "--tensorboard", tmp_path / "tb", "--run-dir", tmp_path / "r",
                  env={"PYTHONPATH": path})
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("--tensorboard needs tensorboardX: pip install 'mpinn[tensorboard]'") == 1
    assert not (tmp_path / "tb").exists() and not (tmp_path / "r" / "checkpoint.h5").exists()


def test_a_resume_purges_what_the_failed_run_wrote_after_its_checkpoint(tmp_path):
    """A rank fails at step 40: records of steps 25-35 were written after the checkpoint of step
    23; the resumed run redoes them, and TensorBoard shows each step once, as metrics.jsonl."""
    args = ["train", "--hidden", "16", "--log-every", 5, "--epochs", 2, "--tensorboard",
            tmp_path / "tb", "--run-dir", tmp_path / "r"]
    failed = run_mpinn(2, *args, env={"MPINN_FAULT": "raise:rank=1:step=40"})
    assert failed.returncode != 0
    ok(run_mpinn(2, *args, "--resume"))
    got = scalars(tmp_path / "tb")
    records = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    steps = [s for s, _ in got["train/loss"]]
    assert steps == [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and 35 in steps
