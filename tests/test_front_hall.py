"""The front hall: option sections and their policies, the Trainer with hooks and nothing else (no
options, a fake engine and batch source), the run folder's names. Unit tier: no MPI launch."""
import dataclasses
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mpinn.config import (KEPT_ON_RESUME, SET_BY_SWEEP, SWEEP_CHANGEABLE_ON_RESUME, Resume,
                          TrainConfig, TrainOptions)
from mpinn.engine import StepResult
from mpinn.errors import UsageError
from mpinn.hooks import Hook
from mpinn.options import from_options
from mpinn.rundir import RunDir
from mpinn.runtime.signals import NoStopRequest
from mpinn.runtime.timeline import NullTimeline
from mpinn.runtime.watchdog import NullWatchdog
from mpinn.trainer import Guard, LoopState, Trainer

from helpers import mpinn_env

# the policy lists as they were kept by hand before the sections declared them
KEPT_BEFORE = {"data", "val_data", "x_key", "y_key", "hidden", "activation", "output_activation",
               "loss", "classes", "optimizer", "lr", "momentum", "nesterov", "beta1", "beta2",
               "eps", "weight_decay", "batch_size", "seed", "shuffle", "lr_schedule",
               "warmup_steps", "min_lr", "step_size", "gamma", "lr_scale", "lr_ref_batch",
               "clip_grad_norm", "dropout"}
SWEEP_CHANGEABLE_BEFORE = {"out", "resume", "ranks_per_trial", "threads", "debug", "log_every",
                           "stall_warning", "stall_timeout", "signal_grace",
                           "checkpoint_on_signal", "check_every", "progress"}


def test_every_train_option_is_declared_once_in_a_section():
    flat = [f.name for f in dataclasses.fields(TrainConfig)]
    in_sections = [f.name for _, f in TrainOptions.section_fields()]
    assert flat == in_sections and len(set(flat)) == len(flat) == 77
    sizes = {s.name: len(dataclasses.fields(s.type)) for s in dataclasses.fields(TrainOptions)}
    assert sizes == {"data": 10, "model": 11, "optim": 14, "schedule": 15, "parallel": 9, "run": 12,
                     "safety": 6}


def test_policies_come_from_the_declarations_and_match_the_old_lists():
    assert set(KEPT_ON_RESUME) == KEPT_BEFORE | {  # and those added since
        "scale_inputs", "scale_targets", "monitor", "plateau_factor", "plateau_patience",
        "plateau_cooldown", "plateau_threshold", "val_fraction", "pos_weight", "class_weight",
        "weight_key", "weight_init", "alpha", "trust_coefficient", "trust_clip",
        "leaky_slope", "dtype"}
    assert SET_BY_SWEEP == ("run_dir", "resume", "overwrite")
    from mpinn import config, model
    assert config.DTYPES == model.DTYPES  # config does not import the kernels
    assert set(SWEEP_CHANGEABLE_ON_RESUME) == SWEEP_CHANGEABLE_BEFORE


@pytest.mark.parametrize("given,resume", [("no", Resume.NO), ("yes", Resume.YES),
                                          ("auto", Resume.AUTO), (True, Resume.YES),
                                          (False, Resume.NO)])
def test_sections_hold_real_types(given, resume):
    cfg, _ = from_options(TrainConfig, hidden=[32, 16], resume=given)
    options = cfg.sections()
    assert options.model.hidden == (32, 16) and options.run.resume is resume
    flat = options.flat()  # what a checkpoint records: the command line's spelling
    assert flat["hidden"] == "32,16" and flat["resume"] == {"no": False, "yes": True}.get(
        resume.value, "auto")
    again = options.replace(hidden="8", lr=0.5)
    assert again.model.hidden == (8,) and again.optim.lr == 0.5 and options.optim.lr == 1e-3


def test_bounds_live_on_the_fields():
    with pytest.raises(UsageError, match="--dropout must be in \\[0, 1\\)"):
        from_options(TrainConfig, dropout=1.0)
    with pytest.raises(UsageError, match="--keep-checkpoints must not be negative"):
        from_options(TrainConfig, keep_checkpoints=-1)


def test_run_dir_owns_the_names_and_the_set_aside(tmp_path):
    run = RunDir(str(tmp_path / "r"))
    assert run.claim(resume=False, overwrite=False) is None
    for path in (run.checkpoint, run.metrics):
        open(path, "w").write("old")
    with pytest.raises(UsageError, match="holds a run"):
        run.check_new_run(resume=False, overwrite=False)
    assert run.set_aside() and run.run_files() == []
    open(run.metrics, "w").write("new")
    run.restore_set_aside()
    assert open(run.metrics).read() == "old" and sorted(run.run_files()) == [
        "checkpoint.h5", "metrics.jsonl"]
    run.release()


# -- the Trainer with a fake engine, batch source and comm ----------------------------------------
class FakeLoss:
    weighted = False
    def scale(self, rows, k):
        return 1.0 / rows


class FakeArch:
    loss_fn, sizes = FakeLoss(), (3, 2)


class FakeEngine:
    arch, timeline = FakeArch(), NullTimeline()

    def __init__(self):
        self.scales, self.watchdog = [], None

    def step(self, xb, yb, rows, scale, stop=False, ids=None, weights=None):
        self.scales.append(scale)
        return StepResult(float(rows), rows, rows, False, True)


class FakeBatches:
    counts = np.array([2, 2, 1])  # this reader's rows of 3 global batches of 4, 4 and 2 rows
    shuffle_seconds, own_weights = 0.0, False

    def global_rows(self, k):
        return (4, 4, 2)[k]

    def epoch(self, epoch):
        batches = lambda k: (np.zeros((int(self.counts[k]), 3)), None)  # noqa: E731
        batches.rows_of = batches.weights_of = lambda k: None
        batches.close = lambda: None
        return batches


class FakeComm:
    rank, size, is_root = 0, 1, True

    def barrier(self):
        pass

    def checked(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


class Recorder(Hook):
    def __init__(self):
        self.events = []

    def record(self, name, state):
        self.events.append((name, state.step))

    def on_train_begin(self, state):
        self.record("on_train_begin", state)

    def on_loop_start(self, state):
        self.record("on_loop_start", state)

    def on_step_end(self, state, result):
        self.record("on_step_end", state)

    def on_epoch_end(self, state, record):
        self.record("on_epoch_end", state)

    def after_epoch(self, state):
        self.record("after_epoch", state)

    def on_train_end(self, state):
        self.record("on_train_end", state)


def test_trainer_steps_epochs_and_calls_its_hooks_in_order():
    recorder, engine = Recorder(), FakeEngine()
    state = LoopState(step=0, start_step=0, total_steps=8, steps_per_epoch=3, epochs=3)
    trainer = Trainer(engine, FakeBatches(), [recorder], RunDir("unused"), comm=FakeComm(),
                      log=None, state=state, guard=Guard(NoStopRequest(), NullWatchdog(), Faults()))
    trainer.train()
    steps = [("on_step_end", s) for s in range(1, 4)]
    assert recorder.events == (
        [("on_train_begin", 0), ("on_loop_start", 0)]
        + steps + [("on_epoch_end", 3), ("after_epoch", 3)]
        + [("on_step_end", s) for s in range(4, 7)] + [("on_epoch_end", 6), ("after_epoch", 6)]
        + [("on_step_end", 7), ("on_step_end", 8), ("on_train_end", 8)])  # --steps 8: no 3rd end
    # the gradient's scale is 1 / the global batch's rows, not this reader's
    assert engine.scales == [0.25, 0.25, 0.5] * 2 + [0.25, 0.25]
    assert trainer.outcome()["steps"] == 8 and math.isclose(state.train_seconds, 0.0)


class Faults:
    def at(self, *args):
        pass

    def batch(self, step, xb):
        return xb


def test_fit_takes_user_hooks_that_see_each_epochs_whole_record(tmp_path):
    """mpinn.fit(hooks=[...]): a user's hook sees every epoch's record with its validation
    figures, as metrics.jsonl holds them, and the step the checkpoint will carry."""
    body = textwrap.dedent(f"""
        import json, mpinn
        class Epochs(mpinn.Hook):
            seen = []
            def on_epoch_end(self, state, record):
                self.seen.append(dict(record, at=state.step))
        mpinn.fit(epochs=2, batch_size=256, hidden="8", run_dir={str(tmp_path / 'r')!r},
                  hooks=[Epochs()], stall_warning=0)
        print(json.dumps(Epochs.seen))
    """)
    p = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=120,
                       env=mpinn_env())
    assert p.returncode == 0, p.stderr
    seen = json.loads(p.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [dict(s, at=None) for s in seen] == [dict(r, at=None) for r in epochs]
    assert [s["epoch"] for s in seen] == [1, 2] and all("val_loss" in s for s in seen)
    assert [s["at"] for s in seen] == [r["step"] for r in epochs]


def test_a_run_without_a_watchdog_validates_and_checkpoints(tmp_path, capsys):
    """--stall-warning 0 --stall-timeout 0 (no watchdog): the epoch's evaluation and checkpoint
    write tell the stand-in watchdog their phase too (it took none: a TypeError)."""
    from mpinn.cli import main
    code = main(["train", "--epochs", "1", "--hidden", "8", "--stall-warning", "0",
                 "--stall-timeout", "0", "--run-dir", str(tmp_path / "r")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "r" / "checkpoint.h5").exists()
