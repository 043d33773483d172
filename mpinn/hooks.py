"""What happens around the training loop's steps, as hooks (Keras's callbacks are the model): each
receives the loop's state (train.LoopState) at events and may read the trainer it is attached to
(`self.trainer`: engine, batches, run folder, comm, log).

Events, in the order the loop reaches them: on_train_begin (before the shared barrier),
on_loop_start (the clock starts), on_step_end(result), on_epoch_end(record), after_epoch,
on_train_end, then on_summary after the loop's resources are released, or on_failure when the run
ends on an error every rank agreed on. Hooks are called in list order (startup.assemble's).
Every hook decides the same on every rank from values every rank holds (reduced losses, the step):
a collective is never skipped by one rank.
"""
import math
import textwrap
import time

import numpy as np

from . import checkpoint
from .checkpoint import Checkpoint
from .data.scaling import Scaling
from .errors import RunError
from .metrics import MONITORED, headline
from .runtime.process import peak_rss_mb
from .runtime.tensorboard import EventSink


class Hook:
    trainer = None  # set by the Trainer

    def on_train_begin(self, state):
        pass

    def on_loop_start(self, state):
        pass

    def on_step_end(self, state, result):
        pass

    def on_epoch_end(self, state, record):
        pass

    def after_epoch(self, state):
        pass

    def on_train_end(self, state):
        pass

    def on_summary(self, state):
        pass

    def on_failure(self, state):
        pass

    def saved_state(self):
        """What this hook keeps in the checkpoint's loop state (to continue on --resume)."""
        return {}


class Announcement(Hook):
    """The resolved configuration and the run's shape, once, from rank 0."""

    def __init__(self, run_config, lines):
        self.run_config, self.lines = run_config, lines

    def on_train_begin(self, state):
        log = self.trainer.log
        log.info("mpinn train: config " + textwrap.fill(
            " ".join(f"{k}={v!r}" for k, v in self.run_config.items() if k != "data_identity"),
            100, subsequent_indent="  "))
        for line in self.lines:
            log.info(line)


class NonFinitePolicy(Hook):
    """A step whose loss or gradient was not finite (its update was not applied): stop, keeping
    the last good checkpoint, or skip it and go on."""

    def __init__(self, skip):
        self.skip = skip

    def on_step_end(self, state, result):
        if result.finite:
            return
        t = self.trainer
        if not self.skip:
            kept = (f"the last good checkpoint {t.run_dir.checkpoint} (step {state.last_saved}) "
                    "is kept" if state.last_saved is not None else
                    "no checkpoint was written before it")
            t.comm.checked(raise_run, f"non-finite loss or gradient at step {state.step} (epoch "
                                      f"{state.epoch + 1}): the update was not applied and "
                                      f"training stopped; {kept}. Lower --lr, or use "
                                      "--on-nonfinite skip to drop such steps", 3)
        state.skipped += 1
        t.log.info(f"warning: step {state.step}: non-finite loss or gradient, update skipped "
                   f"({state.skipped} so far)")


class Metrics(Hook):
    """Loss, accuracy and rate every `every` steps (one small Allreduce of a window of sums), the
    progress bar between, the epoch's records, all in RUN_DIR/metrics.jsonl."""

    def __init__(self, every, resumed, record_grad_norm):
        self.every, self.resumed, self.record_grad_norm = every, resumed, record_grad_norm
        # loss sum, correct, rows and row weights (rows when unweighted) since the last log line,
        # and since the epoch began (summed over ranks)
        self.window, self.epoch_total = np.zeros(4), np.zeros(4)
        self.grad_norm, self.t_window, self.window_steps = 0.0, 0.0, 0

    def on_loop_start(self, state):
        t = self.trainer
        t.log.open_metrics(t.run_dir.metrics, append=self.resumed,
                           from_step=state.step if self.resumed else None)
        self.t_window = time.perf_counter()

    def on_step_end(self, state, result):
        self.grad_norm = result.grad_norm
        self.window_steps += 1
        if result.finite:
            self.window += (result.loss, result.correct, result.rows,
                            result.rows if result.weight is None else result.weight)
        if (state.step % self.every == 0 or state.step == state.total_steps
                or state.batch == state.steps_per_epoch - 1):
            self.log_window(state)
        elif self.trainer.log.bar:
            self.show_progress(state)

    def show_progress(self, state):
        """The terminal's progress bar: this epoch's steps, samples/s and time to the end."""
        elapsed = state.train_seconds + time.perf_counter() - self.t_window
        steps_done = state.step - state.start_step
        rate = (
            state.trained_samples / max(state.train_seconds, 1e-9) if state.train_seconds else 0.0
        )
        eta = elapsed / max(steps_done, 1) * (state.total_steps - state.step)
        self.trainer.log.progress(state.epoch + 1, state.epochs, state.batch + 1,
                                  state.steps_per_epoch, rate, eta)

    def log_window(self, state):
        """Loss, accuracy and rate since the last line, summed over ranks (one small Allreduce)."""
        t = self.trainer
        total = t.comm.allreduce_sum(self.window)
        self.epoch_total += total
        now = time.perf_counter()
        loss_sum, correct, rows, weight = total
        mean_loss, acc = t.arch.loss_fn.summarize(loss_sum, correct, rows, t.arch.sizes[-1],
                                                  weight)
        state.last_train_loss = mean_loss
        rate = total[2] / max(now - self.t_window, 1e-9)
        state.trained_samples += int(total[2])
        state.train_seconds += now - self.t_window
        epoch_end = state.batch == state.steps_per_epoch - 1 or state.step == state.total_steps
        if t.log.bar and not epoch_end:  # the bar shows the epoch; the record keeps the figures
            self.show_progress(state)
        else:
            t.log.info(f"epoch {state.epoch + 1}/{state.epochs} step {state.step} loss "
                       f"{mean_loss:.4f}" + (f" acc {acc:.4f}" if acc is not None else "")
                       + f" samples/s {rate:,.0f}")
        record = {"kind": "train", "epoch": state.epoch + 1, "step": state.step,
                  "loss": mean_loss, "accuracy": acc, "samples": int(total[2]),
                  "samples_per_s": rate,
                  "step_s": (now - self.t_window) / max(self.window_steps, 1),
                  "lr": t.engine.optimizer.lr}
        if self.record_grad_norm:
            record["grad_norm"] = self.grad_norm  # of the last step, before clipping
        t.log.metrics(record)
        self.window[:] = 0
        self.t_window, self.window_steps = now, 0

    def on_epoch_end(self, state, record):
        """The epoch's mean training loss (and accuracy) join its record, then it is written."""
        loss_sum, correct, rows, weight = self.epoch_total
        if rows:
            t = self.trainer
            loss, accuracy = t.arch.loss_fn.summarize(loss_sum, correct, rows, t.arch.sizes[-1],
                                                      weight)
            record["loss"] = float(loss)
            if accuracy is not None:
                record["accuracy"] = float(accuracy)
        self.epoch_total[:] = 0
        self.trainer.log.metrics(record)

    def after_epoch(self, state):
        self.t_window = time.perf_counter()  # samples/s measures training, not evaluation or I/O


class ReplicaCheck(Hook):
    """Every `every` steps, every rank must hold the same parameters."""

    def __init__(self, every):
        self.every = every

    def on_step_end(self, state, result):
        if state.step % self.every == 0 and not self.trainer.engine.replicas_agree():
            raise RuntimeError(f"ranks hold different parameters after step {state.step}")


class Validation(Hook):
    """Loss and accuracy on the validation data after every epoch, into the epoch's record."""

    def __init__(self, evaluate):
        self.evaluate = evaluate

    def on_epoch_end(self, state, record):
        t = self.trainer
        t0 = time.perf_counter()
        t.guard.watchdog.begin(state.step, "evaluation")
        t.guard.faults.at("evaluate", state.step)
        record["val_loss"], record["val_accuracy"], metrics = self.evaluate(t.engine)
        t.guard.watchdog.end()
        t.engine.timeline.add("evaluate", t0, time.perf_counter())
        said = ""
        for name, value in metrics.items():  # the headline figure as a scalar, all in val_metrics
            one = headline(name, value)
            if one is not None and name != "accuracy":
                record[f"val_{name}"] = one
                said += f" {name} {one:.4f}"
        if metrics:
            record["val_metrics"] = metrics
        t.log.info(f"epoch {record['epoch']}/{state.epochs} validation loss "
                   f"{record['val_loss']:.4f}" + (f" accuracy {record['val_accuracy']:.4f}"
                                                  if record["val_accuracy"] is not None else "")
                   + said)


class EarlyStopping(Hook):
    """Keep the best weights in RUN_DIR/best.h5; stop after `patience` epochs without an
    improvement of more than `delta` in the monitored figure (0: off, its state still carried
    from checkpoint to checkpoint). Validation figures are the same on every rank, so every rank
    decides the same."""

    def __init__(self, patience, delta, checkpoints, saved=None, monitor="val_loss"):
        self.patience, self.delta, self.checkpoints = patience, delta, checkpoints
        self.monitor, self.sign = monitor, 1.0 if MONITORED[monitor] == "min" else -1.0
        saved = saved or {}
        self.best = self.sign * saved.get(f"best_{monitor}", self.sign * math.inf)  # lower: better
        self.bad_epochs = saved.get("bad_epochs", 0)

    def on_epoch_end(self, state, record):
        if not self.patience:
            return
        value = self.sign * record[self.monitor]
        if value < self.best - self.delta:
            self.best, self.bad_epochs = value, 0
            self.checkpoints.write(self.trainer.run_dir.best, record["epoch"])
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            what = self.monitor.replace("val_", "the validation ")
            state.finished = (f"early stopping: {what} has not improved on "
                              f"{self.sign * self.best:.4f} for {self.bad_epochs} epochs")
            record["stopped"] = state.finished

    def saved_state(self):
        return {f"best_{self.monitor}": self.sign * self.best, "bad_epochs": self.bad_epochs}


class PlateauSchedule(Hook):
    """--lr-schedule plateau: after each epoch's validation, the schedule's Plateau (lr.py) sees
    the monitored figure and may cut the rate; its state rides in the checkpoint."""

    def __init__(self, plateau, monitor, saved=None):
        self.plateau, self.monitor = plateau, monitor
        self.plateau.restore((saved or {}).get("plateau", {}))

    def on_epoch_end(self, state, record):
        self.plateau.step(record[self.monitor])
        record["lr_next"] = self.plateau.lr

    def saved_state(self):
        return {"plateau": self.plateau.state()}


class Checkpoints(Hook):
    """Rank 0 writes RUN_DIR/checkpoint.h5 atomically at the end of every epoch and of training
    (a pipeline gathers it there first), keeping `keep` step checkpoints. With --overwrite the
    previous run is set aside at the start and dropped at the first checkpoint, or put back
    when the new run fails before it."""

    def __init__(self, run_config, seed, keep, replace_old, scaling=None):
        self.run_config, self.seed, self.keep, self.replace_old = (
            run_config,
            seed,
            keep,
            replace_old,
        )
        self.scaling = scaling or Scaling()  # what the network's inputs and targets are scaled by
        self.set_aside = False  # the previous run's files wait aside (rundir.py)
        self.saved_at = -1

    def on_train_begin(self, state):
        t = self.trainer
        if self.replace_old:  # every input is checked by now: the old run goes aside
            moved = t.comm.on_root(t.run_dir.set_aside, default=False)
            self.set_aside = t.comm.any_rank(moved)  # the same everywhere

    def checkpoint(self, state, epoch):
        t = self.trainer
        params, opt_state = t.engine.full_state()
        opt = t.engine.optimizer
        saved = {k: v for hook in t.hooks for k, v in hook.saved_state().items()}
        return Checkpoint(t.arch, params, opt.name, opt.t, opt_state, epoch, state.step,
                          self.seed, self.run_config, saved, self.scaling)

    def write(self, path, epoch):
        """Rank 0 writes the current weights to path atomically (collective: a pipeline
        gathers)."""
        t = self.trainer
        ckpt = self.checkpoint(t.state, epoch)
        t.comm.on_root(checkpoint.save, path, ckpt)

    def save(self, state, epoch):
        t = self.trainer
        t0 = time.perf_counter()
        t.guard.watchdog.begin(state.step, "checkpoint write")
        ckpt, step = self.checkpoint(state, epoch), state.step
        t.comm.on_root(checkpoint.save, t.run_dir.checkpoint, ckpt,
                       keep=self.keep, keep_in=t.run_dir.steps,
                       before_rename=lambda: t.guard.faults.at("checkpoint", step))
        t.guard.watchdog.end()
        state.last_saved = self.saved_at = step
        if self.set_aside:  # the new run has a checkpoint: the one it replaces may go
            t.comm.on_root(t.run_dir.drop_set_aside)
            self.set_aside = False
        t.engine.timeline.add("checkpoint", t0, time.perf_counter())

    def on_epoch_end(self, state, record):
        self.save(state, record["epoch"])

    def on_train_end(self, state):
        if self.saved_at != state.step:
            self.save(state, state.step // state.steps_per_epoch)

    def on_failure(self, state):
        """A run started with --overwrite ended before its first checkpoint: the run it was
        replacing goes back in place (rank 0; said once)."""
        t = self.trainer
        if self.set_aside and t.comm.is_root:
            try:
                t.run_dir.restore_set_aside()
                t.log.info(f"mpinn train: no checkpoint of this run was written; the run it "
                           f"replaced (--overwrite) is back in {t.run_dir}")
            except OSError as e:
                t.log.warn(f"the run this one replaced (--overwrite) could not be put back: "
                           f"{e}; its files are in {t.run_dir.set_aside_path}")
        self.set_aside = False


class TensorBoard(Hook):
    """Rank 0 writes every metrics record as TensorBoard scalars too (runtime/tensorboard.py):
    its sink joins rank 0's Log, decided once, when the loop starts."""

    def __init__(self, folder, resumed):
        self.folder, self.resumed, self.sink = folder, resumed, None

    def on_loop_start(self, state):
        t = self.trainer
        # resumed: what the stopped run wrote after its checkpoint's step is redone, so goes
        self.sink = t.comm.on_root(EventSink, self.folder,
                                   state.step + 1 if self.resumed else None)
        if self.sink is not None:
            t.log.sinks.append(self.sink)

    def on_summary(self, state):
        self.close()

    def on_failure(self, state):
        self.close()

    def close(self):
        if self.sink is not None:
            self.trainer.log.sinks.remove(self.sink)
            self.sink.close()
            self.sink = None


class Summary(Hook):
    """Final checks and figures: every replica agrees, rates, memory, pipeline stages, the
    timeline file, and the last line."""

    def __init__(self, startup, timeline_path, micro_batches):
        self.startup, self.timeline_path, self.micro_batches = startup, timeline_path, micro_batches

    def on_summary(self, state):
        t, startup = self.trainer, self.startup
        comm, log, engine = t.comm, t.log, t.engine
        if not engine.replicas_agree():
            raise RuntimeError("ranks hold different parameters at the end of training")
        rate = state.trained_samples / max(state.train_seconds, 1e-9)
        per_rank = np.zeros((comm.size, 3))  # peak RSS MB, shard MB, shard read seconds
        per_rank[comm.rank] = (peak_rss_mb(), startup.shard_bytes / 2**20, startup.load_s)
        comm.allreduce_(per_rank)
        summary = {"kind": "summary", "step": state.step, "samples": state.trained_samples,
                   "train_seconds": state.train_seconds, "samples_per_s": rate,
                   "skipped_steps": state.skipped, "kernels_s": startup.jit_s,
                   "startup_s": state.startup_s, "global_shuffle_s": t.batches.shuffle_seconds,
                   "peak_rss_mb": per_rank[:, 0].tolist(), "shard_mb": per_rank[:, 1].tolist(),
                   "shard_read_s": per_rank[:, 2].tolist()}
        if startup.stages > 1:
            self.summarize_stages(summary, startup.stages)
        log.metrics(summary)
        if engine.timeline.enabled:
            comm.checked(engine.timeline.write, comm, self.timeline_path)
            log.info(f"mpinn train: timeline of {comm.size} rank(s) written to "
                     f"{self.timeline_path} (open it in ui.perfetto.dev or chrome://tracing)")
        log.info(f"mpinn train: ready {state.startup_s:.2f} s after start (kernels "
                 f"{startup.jit_s:.2f} s); peak RSS per rank {per_rank[:, 0].max():,.0f} MB "
                 f"max, data shard {per_rank[:, 1].max():,.1f} MB max, read in "
                 f"{per_rank[:, 2].max():.2f} s")
        if state.finished:
            log.info(f"mpinn train: {state.finished}; best weights in {t.run_dir.best}")
        val = state.last_validation or {}
        final = (f"; validation loss {val['val_loss']:.4f}" + (
            f" accuracy {val['val_accuracy']:.4f}" if val.get("val_accuracy") is not None else "")
            if "val_loss" in val else "")
        log.info(f"mpinn train: done, {state.step} steps, {state.trained_samples:,} samples in "
                 f"{state.train_seconds:.2f} s of training steps ({rate:,.0f} samples/s)"
                 f"{final}; checkpoint {t.run_dir.checkpoint}")

    def summarize_stages(self, summary, stages):
        summary["stages"] = self.trainer.engine.stage_summary()
        summary["ideal_bubble"] = (stages - 1) / (self.micro_batches + stages - 1)
        for st in summary["stages"]:
            self.trainer.log.info(
                f"stage {st['stage']}: {st['layers']} layer(s), compute {st['compute_s']:.3f} s, "
                f"waiting {st['wait_s']:.3f} s, bubble {st['bubble']:.3f} (ideal "
                f"{summary['ideal_bubble']:.3f}), activations {st['activation_bytes']:,} bytes")


def raise_run(message, exit_code):
    raise RunError(message, exit_code)
