"""The training loop: batch -> local gradient -> Allreduce -> the same update on every replica.

    mpirun -n 8 python -m mpinn train --data train.h5 --val-data test.h5 --hidden 512,512 \\
        --epochs 10 --run-dir runs/a
    mpirun -n 8 python -m mpinn train --pipeline-stages 2 --micro-batches 8 ...   # 2 stages x 4
    srun --mpi=pmi2 python -m mpinn train ...         (inside a SLURM allocation)
    python -m mpinn train                               (1 rank, bundled digits data)

Each data-parallel reader (a rank, or a pipeline replica) reads only its part of every global
batch (plan.BatchPlan); its gradient is of (sum of its rows' losses) / (global batch rows), so the
Allreduce SUM is exactly the gradient of the global mean loss. Every rank runs the same number of
steps by construction. Rank 0 writes the checkpoint at the end of every epoch and of training.
"""
import functools
import math
import os
import textwrap
import time

import numpy as np

from . import checkpoint, data
from .checkpoint import Checkpoint
from .errors import AgreedExit, RunError
from .log import Log
from .outputs import SET_ASIDE, drop_set_aside, restore_set_aside, set_aside_run
from .runtime.process import peak_rss_mb, seconds_since_process_start
from .runtime.signals import NoStopRequest, StopRequest
from .runtime.watchdog import NullWatchdog, Watchdog
from .startup import checkpoint_path, set_up, total_updates


def run(cfg, explicit, comm):
    """`mpinn train`: set up (data, network, engine), train epoch by epoch, then the summary."""
    log = Log(comm.rank, comm.size, progress=cfg.progress)
    trainer = Trainer(comm, log, set_up(cfg, explicit, comm, log))
    try:
        try:
            trainer.announce()
            trainer.train()
        finally:  # also when training ends with an error: handlers back, watchdog thread gone
            trainer.release()
        trainer.summarize()
    except AgreedExit:
        # an error every rank agreed on (divergence, a signal, a failed checkpoint): an
        # --overwrite that has no checkpoint yet gives the old run back, and the engine's shared
        # window and communicators are released (a sweep's next trial runs in these processes).
        # Any other exception ends the job (MPI Abort), where a collective release could hang.
        trainer.restore_replaced_run()
        trainer.engine.close()
        raise
    return trainer


class Trainer:
    """The loop's state: the current step, the metrics window, the last checkpoint."""

    def __init__(self, comm, log, setup):
        cfg = setup.cfg
        self.cfg, self.comm, self.log, self.s = cfg, comm, log, setup
        self.engine, self.step, self.arch = setup.engine, setup.step, setup.arch
        self.spe = setup.plan.steps_per_epoch
        self.counts = setup.plan.local_counts()
        self.max_steps = total_updates(cfg, setup.plan)
        state = setup.loop_state or {}
        self.best_loss = state.get("best_val_loss", math.inf)  # early stopping
        self.bad_epochs = state.get("bad_epochs", 0)
        self.finished_early, self.grad_norm, self.last_validation = None, 0.0, {}
        self.last_train_loss = None
        self.ckpt_path = checkpoint_path(cfg)
        self.last_saved = self.step if cfg.resume else None
        self.saved_at, self.skipped, self.stopping = -1, 0, False
        self.set_aside = False  # --overwrite: the previous run's files wait aside (outputs.py)
        self.window = np.zeros(3)  # loss sum, correct, rows since the last log line (this rank)
        self.trained_samples, self.train_seconds, self.shuffle_seconds = 0, 0.0, 0.0
        self.stop = (StopRequest(cfg.signal_grace, comm.rank) if cfg.checkpoint_on_signal
                     else NoStopRequest())
        self.watchdog = (Watchdog(comm, cfg.stall_warning, cfg.stall_timeout, log)
                         if cfg.stall_warning or cfg.stall_timeout else NullWatchdog())
        self.engine.watchdog = self.watchdog

    def announce(self):
        """The resolved configuration and the run's shape, once, from rank 0."""
        s, cfg, grid = self.s, self.cfg, self.s.grid
        self.log.info("mpinn train: config " + textwrap.fill(
            " ".join(f"{k}={v!r}" for k, v in s.run_config.items() if k != "data_identity"), 100,
            subsequent_indent="  "))
        mode = (f"{grid.stages} pipeline stages (layers {self.engine.layers_per_stage}) x "
                f"{grid.replicas} replica(s), {cfg.micro_batches} micro-batches, {cfg.schedule}"
                if grid.stages > 1 else "data parallel" + self.engine.reduction())
        self.log.info(self.lr_summary())
        if s.stream:
            self.log.info(f"mpinn train: inputs streamed from {s.train_path} in chunks of "
                          f"{s.stream.chunk_rows:,} rows read ahead (this rank's slice is larger "
                          "than --memory-budget)")
        self.log.info(f"mpinn train: {self.comm.size} rank(s) [{self.comm.library_version()}], "
                      f"{mode}, network {self.arch.describe()} ({self.arch.n_params:,} "
                      f"parameters, {self.arch.loss}), {s.n_rows} rows, global batch "
                      f"{cfg.batch_size} -> {self.spe} steps/epoch; kernels ready in "
                      f"{s.jit_s:.2f} s")
        if cfg.overwrite:  # every input is checked by now: the old run goes aside
            moved = self.comm.checked(
                lambda: set_aside_run(cfg.run_dir) if self.comm.is_root else False)
            self.set_aside = bool(self.comm.allreduce_minmax(int(moved))[1])  # the same everywhere
        self.log.open_metrics(os.path.join(cfg.run_dir, "metrics.jsonl"), append=cfg.resume,
                              from_step=self.step if cfg.resume else None)

    def lr_summary(self):
        cfg, base = self.cfg, self.s.lr_of.keywords["base"]
        rule = ("" if cfg.lr_scale == "none" else f" = {cfg.lr:g} with {cfg.lr_scale} scaling for "
                f"global batch {cfg.batch_size} vs {cfg.lr_ref_batch}")
        warm = f", warm-up {cfg.warmup_steps} updates" if cfg.warmup_steps else ""
        return (f"mpinn train: learning rate {base:g}{rule}, {cfg.lr_schedule} schedule{warm} "
                f"over {self.max_steps} updates"
                + (f"; gradients clipped to norm {cfg.clip_grad_norm:g}"
                   if cfg.clip_grad_norm else ""))

    def train(self):
        """Epochs of steps; after each whole epoch, validation and a checkpoint."""
        self.comm.barrier()  # a shared clock origin for the timeline and the first window
        self.engine.timeline.start()
        self.startup_s = seconds_since_process_start()
        self.t_window = time.perf_counter()
        while self.step < self.max_steps and not self.stopping and not self.finished_early:
            epoch, first = divmod(self.step, self.spe)
            batches = self.epoch_batches(epoch)
            try:
                for k in range(first, self.spe):
                    if self.step >= self.max_steps or self.stopping:
                        break
                    self.train_step(batches, k, epoch)
            finally:
                batches.close()
            if self.step % self.spe == 0 and not self.stopping:
                self.end_epoch(epoch)
        if self.saved_at != self.step:
            self.save(self.step // self.spe)
        if self.stopping:
            what = self.stop.name if self.stop.requested else "a signal on another rank"
            self.comm.checked(raise_run, f"stopped by {what} after step {self.step}: final "
                                         f"checkpoint {self.ckpt_path} written; continue with "
                                         "--resume", self.stop.exit_code()
                              if self.stop.requested else 143)

    def epoch_batches(self, epoch):
        """This rank's batches for one epoch, in the order --shuffle asks for."""
        s, cfg, grid = self.s, self.cfg, self.s.grid
        dropout = cfg.dropout > 0  # dropout's masks are keyed by file row: say which rows
        if s.stream:
            return s.stream.batches(self.file_rows(epoch), self.counts, dropout)
        if cfg.shuffle != "global":
            return data.EpochBatches(s.x, s.y, self.counts, cfg.shuffle == "rank", cfg.seed,
                                     epoch, grid.replica,
                                     self.owned_rows() if dropout else None)
        t0 = time.perf_counter()
        ex, ey = self.global_shuffle().epoch(cfg.seed, epoch)
        rows = data.global_shuffle_rows(s.n_rows, cfg.batch_size, cfg.seed, epoch, grid.replica,
                                        grid.replicas) if dropout else None
        self.shuffle_seconds += time.perf_counter() - t0
        return data.EpochBatches(ex, ey, self.counts, False, cfg.seed, epoch, grid.replica, rows)

    def file_rows(self, epoch):
        """The file rows of this reader's steps in an epoch, in order: what the in-memory paths
        gather (EpochBatches' per-rank permutation, the global shuffle's positions)."""
        cfg, grid, owned = self.cfg, self.s.grid, self.owned_rows()
        if cfg.shuffle == "global":
            return data.global_shuffle_rows(self.s.n_rows, cfg.batch_size, cfg.seed, epoch,
                                            grid.replica, grid.replicas)
        if cfg.shuffle == "rank":
            return owned[data.rank_permutation(len(owned), cfg.seed, epoch, grid.replica)]
        return owned

    @functools.cache
    def global_shuffle(self):
        """The exchange of rows between ranks, with its epoch buffers (made at the first epoch)."""
        return data.GlobalShuffle(self.comm, self.s.x, self.s.y, self.s.n_rows,
                                  self.cfg.batch_size)

    @functools.cache
    def owned_rows(self):
        """The file rows this reader owns, in step order (the same every epoch)."""
        return self.s.plan.owned_rows()

    def train_step(self, batches, k, epoch):
        """Global batch k: this rank's part, one engine step, metrics, checks."""
        s, engine = self.s, self.engine
        self.watchdog.begin(self.step + 1)
        s.faults.at("step", self.step + 1, engine)
        t0 = time.perf_counter()
        xb, yb = batches(k)
        xb = s.faults.batch(self.step + 1, xb)
        engine.timeline.add("data", t0, time.perf_counter())
        scale = self.arch.loss_fn.scale(s.plan.global_batch_rows(k), self.arch.sizes[-1])
        engine.optimizer.lr = s.lr_of(engine.optimizer.t)
        res = engine.step(xb, yb, int(self.counts[k]), scale, self.stop.requested,
                          batches.rows_of(k))
        self.grad_norm = res.grad_norm
        self.watchdog.end()
        self.step += 1
        if res.finite:
            self.window += (res.loss, res.correct, res.rows)
        elif self.cfg.on_nonfinite == "stop":
            self.diverged(epoch + 1)
        else:
            self.skipped += 1
            self.log.info(f"warning: step {self.step}: non-finite loss or gradient, update "
                          f"skipped ({self.skipped} so far)")
        if (self.step % self.cfg.log_every == 0 or self.step == self.max_steps
                or k == self.spe - 1):
            self.log_window(epoch)
        elif self.log.bar:
            self.show_progress(epoch, k)
        if self.step % self.cfg.check_every == 0 and not engine.replicas_agree():
            raise RuntimeError(f"ranks hold different parameters after step {self.step}")
        self.stopping = res.stop  # every rank sees the same flag after the same step

    def show_progress(self, epoch, k):
        """The terminal's progress bar: this epoch's steps, samples/s and time to the end."""
        elapsed = self.train_seconds + time.perf_counter() - self.t_window
        steps_done = self.step - self.s.step
        rate = self.trained_samples / max(self.train_seconds, 1e-9) if self.train_seconds else 0.0
        eta = elapsed / max(steps_done, 1) * (self.max_steps - self.step)
        self.log.progress(epoch + 1, self.cfg.epochs, k + 1, self.spe, rate, eta)

    def log_window(self, epoch):
        """Loss, accuracy and rate since the last line, summed over ranks (one small Allreduce)."""
        total = self.comm.allreduce_sum(self.window)
        now = time.perf_counter()
        mean_loss, acc = self.arch.loss_fn.summarize(*total, self.arch.sizes[-1])
        self.last_train_loss = mean_loss
        rate = total[2] / max(now - self.t_window, 1e-9)
        self.trained_samples += int(total[2])
        self.train_seconds += now - self.t_window
        self.log.info(f"epoch {epoch + 1}/{self.cfg.epochs} step {self.step} loss {mean_loss:.4f}"
                      + (f" acc {acc:.4f}" if acc is not None else "")
                      + f" samples/s {rate:,.0f}")
        record = {"kind": "train", "epoch": epoch + 1, "step": self.step, "loss": mean_loss,
                  "accuracy": acc, "samples": int(total[2]), "samples_per_s": rate,
                  "lr": self.engine.optimizer.lr}
        if self.cfg.clip_grad_norm:
            record["grad_norm"] = self.grad_norm  # of the last step, before clipping
        self.log.metrics(record)
        self.window[:] = 0
        self.t_window = now

    def end_epoch(self, epoch):
        """Validation (when there is validation data), the epoch's metrics and checkpoint."""
        record = {"kind": "epoch", "epoch": epoch + 1, "step": self.step}
        self.last_validation = record
        if self.s.evaluate:
            t0 = time.perf_counter()
            self.watchdog.begin(self.step, "evaluation")
            self.s.faults.at("evaluate", self.step)
            record["val_loss"], record["val_accuracy"] = self.s.evaluate(self.engine)
            self.watchdog.end()
            self.engine.timeline.add("evaluate", t0, time.perf_counter())
            self.log.info(f"epoch {epoch + 1}/{self.cfg.epochs} validation loss "
                          f"{record['val_loss']:.4f}"
                          + (f" accuracy {record['val_accuracy']:.4f}"
                             if record["val_accuracy"] is not None else ""))
        if self.cfg.early_stop:
            self.early_stopping(record)
        self.log.metrics(record)
        self.save(epoch + 1)
        self.saved_at = self.step
        self.t_window = time.perf_counter()  # samples/s measures training, not evaluation or I/O

    def early_stopping(self, record):
        """Keep the best weights in best.h5; stop after --early-stop epochs without improvement.
        The validation loss is the same on every rank, so every rank decides the same."""
        if record["val_loss"] < self.best_loss - self.cfg.early_stop_delta:
            self.best_loss, self.bad_epochs = record["val_loss"], 0
            self.write(os.path.join(self.cfg.run_dir, "best.h5"), record["epoch"])
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.cfg.early_stop:
            self.finished_early = (f"early stopping: the validation loss has not improved on "
                                   f"{self.best_loss:.4f} for {self.bad_epochs} epochs")
            record["stopped"] = self.finished_early

    def outcome(self):
        """The run's final figures, the same on every rank (a sweep records them)."""
        val = self.last_validation
        return {"val_loss": val.get("val_loss"), "val_accuracy": val.get("val_accuracy"),
                "train_loss": self.last_train_loss, "epochs": self.step // self.spe,
                "steps": self.step}

    def loop_state(self):
        return {"best_val_loss": self.best_loss, "bad_epochs": self.bad_epochs}

    def write(self, path, epoch):
        """Rank 0 writes the current weights to path atomically (collective: a pipeline gathers)."""
        params, state = self.engine.full_state()
        opt, step, cfg = self.engine.optimizer, self.step, self.cfg
        self.comm.checked(lambda: checkpoint.save(
            path, Checkpoint(self.arch, params, opt.name, opt.t, state, epoch, step, cfg.seed,
                             self.s.run_config, self.loop_state()))
            if self.comm.is_root else None)

    def save(self, epoch):
        """Rank 0 writes the checkpoint atomically (a pipeline gathers it there first)."""
        t0 = time.perf_counter()
        self.watchdog.begin(self.step, "checkpoint write")
        params, state = self.engine.full_state()
        opt, step, cfg = self.engine.optimizer, self.step, self.cfg
        self.comm.checked(lambda: checkpoint.save(
            self.ckpt_path, Checkpoint(self.arch, params, opt.name, opt.t, state, epoch, step,
                                       cfg.seed, self.s.run_config, self.loop_state()),
            keep=cfg.keep_checkpoints, before_rename=lambda: self.s.faults.at("checkpoint", step))
            if self.comm.is_root else None)
        self.watchdog.end()
        self.last_saved = step
        if self.set_aside:  # the new run has a checkpoint: the one it replaces may go
            self.comm.checked(lambda: drop_set_aside(self.cfg.run_dir) if self.comm.is_root
                              else None)
            self.set_aside = False
        self.engine.timeline.add("checkpoint", t0, time.perf_counter())

    def restore_replaced_run(self):
        """A run started with --overwrite ended before its first checkpoint: the run it was
        replacing goes back in place (rank 0; said once)."""
        if self.set_aside and self.comm.is_root:
            try:
                restore_set_aside(self.cfg.run_dir)
                self.log.info(f"mpinn train: no checkpoint of this run was written; the run it "
                              f"replaced (--overwrite) is back in {self.cfg.run_dir}")
            except OSError as e:
                self.log.warn(f"the run this one replaced (--overwrite) could not be put back: "
                              f"{e}; its files are in {self.cfg.run_dir}/{SET_ASIDE}")
        self.set_aside = False

    def diverged(self, epoch):
        kept = (f"the last good checkpoint {self.ckpt_path} (step {self.last_saved}) is kept"
                if self.last_saved is not None else "no checkpoint was written before it")
        self.comm.checked(raise_run, f"non-finite loss or gradient at step {self.step} (epoch "
                                     f"{epoch}): the update was not applied and training "
                                     f"stopped; {kept}. Lower --lr, or use --on-nonfinite skip "
                                     "to drop such steps", 3)

    def release(self):
        self.stop.restore()
        self.watchdog.stop()
        if self.s.lock is not None:
            self.s.lock.release()

    def summarize(self):
        """Final checks and figures: every replica agrees, rates, memory, pipeline stages."""
        comm, s, log = self.comm, self.s, self.log
        if not self.engine.replicas_agree():
            raise RuntimeError("ranks hold different parameters at the end of training")
        rate = self.trained_samples / max(self.train_seconds, 1e-9)
        per_rank = np.zeros((comm.size, 3))  # peak RSS MB, shard MB, shard read seconds
        per_rank[comm.rank] = (peak_rss_mb(), s.shard_bytes / 2**20, s.load_s)
        comm.allreduce_(per_rank)
        summary = {"kind": "summary", "step": self.step, "samples": self.trained_samples,
                   "train_seconds": self.train_seconds, "samples_per_s": rate,
                   "skipped_steps": self.skipped, "kernels_s": s.jit_s,
                   "startup_s": self.startup_s, "global_shuffle_s": self.shuffle_seconds,
                   "peak_rss_mb": per_rank[:, 0].tolist(), "shard_mb": per_rank[:, 1].tolist(),
                   "shard_read_s": per_rank[:, 2].tolist()}
        if s.grid.stages > 1:
            self.summarize_stages(summary)
        log.metrics(summary)
        timeline = self.engine.timeline
        if timeline.enabled:
            comm.checked(timeline.write, comm, self.cfg.timeline)
            log.info(f"mpinn train: timeline of {comm.size} rank(s) written to "
                     f"{self.cfg.timeline} (open it in ui.perfetto.dev or chrome://tracing)")
        log.info(f"mpinn train: ready {self.startup_s:.2f} s after start (kernels "
                 f"{s.jit_s:.2f} s); peak RSS per rank {per_rank[:, 0].max():,.0f} MB max, data "
                 f"shard {per_rank[:, 1].max():,.1f} MB max, read in {per_rank[:, 2].max():.2f} s")
        if self.finished_early:
            log.info(f"mpinn train: {self.finished_early}; best weights in "
                     f"{os.path.join(self.cfg.run_dir, 'best.h5')}")
        val = self.last_validation
        final = (f"; validation loss {val['val_loss']:.4f}" + (
            f" accuracy {val['val_accuracy']:.4f}" if val.get("val_accuracy") is not None else "")
            if "val_loss" in val else "")
        log.info(f"mpinn train: done, {self.step} steps, {self.trained_samples:,} samples in "
                 f"{self.train_seconds:.2f} s of training steps ({rate:,.0f} samples/s)"
                 f"{final}; checkpoint {self.ckpt_path}")
        self.engine.close()
        log.close()

    def summarize_stages(self, summary):
        grid = self.s.grid
        summary["stages"] = self.engine.stage_summary()
        summary["ideal_bubble"] = (grid.stages - 1) / (self.cfg.micro_batches + grid.stages - 1)
        for st in summary["stages"]:
            self.log.info(f"stage {st['stage']}: {st['layers']} layer(s), compute "
                          f"{st['compute_s']:.3f} s, waiting {st['wait_s']:.3f} s, bubble "
                          f"{st['bubble']:.3f} (ideal {summary['ideal_bubble']:.3f}), "
                          f"activations {st['activation_bytes']:,} bytes")


def raise_run(message, exit_code):
    raise RunError(message, exit_code)
