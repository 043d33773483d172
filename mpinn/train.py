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
import dataclasses
import functools
import glob
import math
import os
import textwrap
import time
from dataclasses import dataclass

import numpy as np

from . import checkpoint, data, lr
from .checkpoint import CHECKPOINT_NAME, Checkpoint
from .errors import RunError, UsageError
from .config import parse_hidden
from .log import Log
from .model import Architecture, init_params
from .outputs import (RunDirLock, check_new_run, check_output_path, clear_run,
                      prepare_run_dir)
from .plan import BatchPlan, Grid, even_part
from .losses import LOSSES
from .runtime.faults import FaultInjector
from .runtime.process import available_memory_bytes, peak_rss_mb, seconds_since_process_start
from .runtime.signals import NoStopRequest, StopRequest
from .runtime.threads import limit_threads, oversubscription
from .runtime.timeline import Timeline
from .runtime.watchdog import NullWatchdog, Watchdog
from .session import (Evaluator, broadcast_checkpoint, check_labels, data_paths, load_split,
                      make_engine)

EVAL_ROWS = 1024  # rows per forward pass when evaluating


def run(cfg, explicit, comm):
    """`mpinn train`: set up (data, network, engine), train epoch by epoch, then the summary."""
    log = Log(comm.rank, comm.size, progress=cfg.progress)
    trainer = Trainer(comm, log, set_up(cfg, explicit, comm, log))
    trainer.announce()
    try:
        trainer.train()
    finally:  # also when training ends with an error: handlers back, watchdog thread gone
        trainer.release()
    trainer.summarize()
    return trainer.engine


@dataclass
class Setup:
    """Everything the loop needs, decided once before the first step."""
    cfg: object           # the run's options (on resume: the checkpoint's where they must agree)
    grid: Grid
    faults: FaultInjector
    lock: object          # rank 0's lock on RUN_DIR (None elsewhere)
    train_path: str
    val_path: str
    arch: Architecture
    n_rows: int
    x: np.ndarray
    y: np.ndarray
    plan: BatchPlan
    evaluate: Evaluator
    engine: object
    step: int             # optimizer steps already made (resume)
    run_config: dict      # the resolved configuration, saved in every checkpoint
    load_s: float         # this rank's shard read time
    shard_bytes: int
    jit_s: float
    lr_of: object = None  # update number (0 for the first) -> learning rate
    loop_state: dict = None  # the checkpoint's loop state on resume (early stopping)


def set_up(cfg, explicit, comm, log):
    """Threads, rank grid, run folder, start checkpoint, this rank's data, network and engine."""
    limit_threads(cfg.threads)
    warning = oversubscription(comm.node_size(), cfg.threads)
    if warning and comm.is_root:
        log.warn(warning)
    faults = FaultInjector.from_env(comm.rank)
    grid = comm.checked(Grid, cfg.pipeline_stages, comm.size, comm.rank)
    lock = comm.checked(lambda: claim_run_dir(cfg) if comm.is_root else None)
    ckpt = broadcast_checkpoint(comm, lambda: start_checkpoint(cfg, log))
    if cfg.resume:
        cfg = comm.checked(resumed_config, cfg, explicit, ckpt)
    train_path, val_path = comm.checked(data_paths, cfg)
    comm.checked(check_mode, cfg, grid)
    loss = ckpt.arch.loss if ckpt else cfg.loss
    cols = data.Columns(cfg.x_key, cfg.y_key, loss)

    def train_selections(n):
        faults.at("load")
        return data.plan_selections(BatchPlan(n, cfg.batch_size, grid.replica, grid.replicas))
    t_load = time.perf_counter()
    n_rows, n_features, n_targets, x, y = load_split(
        comm, train_path, cols, train_selections, grid.replicas, grid.is_first, grid.is_last,
        "ranks" if grid.stages == 1 else "pipeline replicas")
    t_load = time.perf_counter() - t_load
    plan = BatchPlan(n_rows, cfg.batch_size, grid.replica, grid.replicas)
    n_outputs = (class_count(comm, cfg, ckpt, y, train_path, plan)
                 if LOSSES[loss].integer_labels else n_targets)
    arch = comm.checked(architecture, cfg, explicit, ckpt, n_features, n_outputs)
    comm.checked(check_memory, cfg, arch, grid,
                 -(-int(plan.local_counts().max()) // cfg.accumulate), comm.node_size())
    evaluate = validation(cfg, comm, grid, cols, val_path, train_path, n_features, arch)
    engine, step = build_engine(cfg, comm, grid, arch, plan, ckpt, log, bool(evaluate))
    lr_of = comm.checked(learning_rates, cfg, plan, bool(evaluate))
    loop_state = dict(ckpt.state) if ckpt is not None and cfg.resume else {}
    del ckpt  # the engine holds what this rank needs (a stage: its slice only)
    t0 = time.perf_counter()
    comm.first_on_each_node_then_rest(lambda: engine.warmup(x, y))
    jit_s = time.perf_counter() - t0
    if cfg.timeline:
        comm.checked(check_output_path, cfg.timeline, "--timeline")
        engine.timeline = Timeline()
    run_config = {**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "data": train_path,
                  "val_data": val_path or "", "ranks": comm.size}
    return Setup(cfg, grid, faults, lock, train_path, val_path, arch, n_rows, x, y, plan,
                 evaluate, engine, step, run_config, t_load,
                 sum(a.nbytes for a in (x, y) if a is not None), jit_s, lr_of, loop_state)


def total_updates(cfg, plan):
    spe = plan.steps_per_epoch
    return cfg.epochs * spe if cfg.steps == 0 else min(cfg.steps, cfg.epochs * spe)


def learning_rates(cfg, plan, has_validation):
    """The run's learning rate of every update (lr.py), after checking the schedule's options."""
    total = total_updates(cfg, plan)
    if cfg.warmup_steps and cfg.warmup_steps >= total:
        raise UsageError(f"--warmup-steps {cfg.warmup_steps} must be fewer than the run's "
                         f"{total} updates")
    if cfg.early_stop and not has_validation:
        raise UsageError("--early-stop needs validation data (--val-data)")
    base = lr.base_lr(cfg.lr, cfg.lr_scale, cfg.batch_size, cfg.lr_ref_batch)
    return functools.partial(lr.lr_at, base=base, kind=cfg.lr_schedule, warmup=cfg.warmup_steps,
                             total=total, min_lr=cfg.min_lr, step_size=cfg.step_size,
                             gamma=cfg.gamma)


def claim_run_dir(cfg):
    """Rank 0: create and lock RUN_DIR; a new run may not land on an old one unasked."""
    prepare_run_dir(cfg.run_dir)
    lock = RunDirLock(cfg.run_dir)
    try:
        check_new_run(cfg.run_dir, cfg.resume, cfg.overwrite)
    except UsageError:
        lock.release()
        raise
    return lock


# What a resumed run takes from its checkpoint (the rest may change on resume: epochs, steps,
# ranks and pipeline layout, threads, and run-time knobs such as logging and timeouts).
KEPT_ON_RESUME = ("data", "val_data", "x_key", "y_key", "hidden", "activation",
                  "output_activation", "loss", "classes", "optimizer", "lr", "momentum",
                  "nesterov", "beta1", "beta2", "eps", "weight_decay", "batch_size", "seed",
                  "shuffle", "lr_schedule", "warmup_steps", "min_lr", "step_size", "gamma",
                  "lr_scale", "lr_ref_batch", "clip_grad_norm", "dropout")


def resumed_config(cfg, explicit, ckpt):
    """cfg with the run's own data and options from its checkpoint; an explicit option that
    contradicts them is an error."""
    saved, updates = ckpt.config, {}
    for key in KEPT_ON_RESUME:
        if key not in saved:
            continue
        mine, theirs = getattr(cfg, key), saved[key]
        if key in explicit and not same_setting(key, mine, theirs):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {mine!r} differs from the run's {theirs!r}: --resume "
                             "continues a run on its own data and options. Drop the option, or "
                             "start a new run (--overwrite, or another --run-dir)")
        updates[key] = theirs
    return dataclasses.replace(cfg, **updates)


def same_setting(key, mine, theirs):
    if key in ("data", "val_data"):
        return bool(mine) == bool(theirs) and (
            not mine or os.path.realpath(mine) == os.path.realpath(theirs))
    if key == "hidden":
        return parse_hidden(mine) == parse_hidden(theirs)
    return mine == theirs


def class_count(comm, cfg, ckpt, y, path, plan):
    """Classes of a cross-entropy network: the checkpoint's, --classes, the class names stored
    with the labels, else the largest label + 1 when the labels are not far sparser than that."""
    if ckpt is not None:
        n = ckpt.arch.sizes[-1]
    elif cfg.classes:
        n = cfg.classes
    else:
        n = comm.checked(data.stored_classes, path, cfg.y_key)
    if n is None:
        top = comm.allreduce_minmax(int(y.max()) if y is not None and y.size else 0)[1]
        local = np.unique(y) if y is not None else np.zeros(0, np.int64)
        distinct = np.unique(comm.allgather_ints(local)).size
        comm.checked(check_sparse_labels, y, top, distinct, path, cfg.y_key, plan)
        n = top + 1
    comm.checked(check_labels, y, n, path, plan.owned_rows)
    return n


def check_sparse_labels(y, top, distinct, path, y_key, plan):
    if top + 1 > 10 * max(distinct, 1) and y is not None and y.size and y.max() == top:
        row = int(plan.owned_rows()[int(np.argmax(y))])
        raise UsageError(f"{path}: label {top} at row {row} of {y_key} would make {top + 1} "
                         f"classes, but the labels take only {distinct} distinct values; pass "
                         f"--classes {top + 1} if that many are meant, or fix the labels")


def check_memory(cfg, arch, grid, max_rows, ranks_on_node):
    """Refuse a network that cannot fit before allocating it."""
    n_state = {"sgd": 0, "momentum": 1, "adam": 2}[cfg.optimizer]
    need = arch.training_bytes(max(max_rows, EVAL_ROWS), n_state, grid.stages)
    available = available_memory_bytes()
    if available and need > available / ranks_on_node:
        gib = 2**30
        raise UsageError(f"the network {arch.describe()} needs about {need / gib:,.1f} GiB per "
                         f"rank (parameters, gradients, optimizer state, activations) but this "
                         f"node has {available / gib:,.1f} GiB available for its {ranks_on_node} "
                         "rank(s); use fewer or narrower layers, a smaller --batch-size, or more "
                         "nodes")


def validation(cfg, comm, grid, cols, val_path, train_path, n_features, arch):
    """An Evaluator over this reader's block of the validation data, or None without one."""
    if not val_path:
        return None
    n_val, val_features, _, vx, vy = load_split(
        comm, val_path, cols, lambda n: data.block_selections(n, grid.replica, grid.replicas), 1,
        grid.is_first, grid.is_last)
    if val_features != n_features:
        comm.checked(raise_usage, f"{val_path} has {val_features} features; {train_path} has "
                                  f"{n_features}")
    if arch.loss_fn.integer_labels:
        first = even_part(n_val, grid.replicas, grid.replica)[0]
        comm.checked(check_labels, vy, arch.sizes[-1], val_path,
                     lambda: first + np.arange(len(vy)))
    return Evaluator(comm, even_part(n_val, grid.replicas, grid.replica)[1], vx, vy, arch)


def build_engine(cfg, comm, grid, arch, plan, ckpt, log, evaluates):
    """This rank's engine with the start weights (rank 0's, broadcast) and, when resuming, the
    optimizer state; returns (engine, optimizer steps already made)."""
    params = ckpt.params if ckpt else init_params(arch, cfg.seed)
    comm.bcast_(params)  # one source of truth for the initial weights: rank 0's
    opt_settings = dict(name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                        nesterov=cfg.nesterov, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    step, opt_state = 0, None
    if cfg.resume:
        step, opt_state = ckpt.global_step, (ckpt.optimizer_step, ckpt.optimizer_state)
        if ckpt.config.get("ranks") != comm.size and cfg.shuffle == "rank":
            log.info(f"note: resuming on {comm.size} ranks a run checkpointed on "
                     f"{ckpt.config.get('ranks')}: shuffled data order differs from an "
                     "uninterrupted run")
    engine = comm.checked(make_engine, comm, grid, arch, params, int(plan.local_counts().max()),
                          opt_settings, opt_state, cfg.partition, cfg.micro_batches, cfg.schedule,
                          EVAL_ROWS if evaluates else 0, cfg.overlap_mb, cfg.accumulate)
    engine.clip_grad_norm = cfg.clip_grad_norm
    engine.set_dropout(cfg.dropout, cfg.seed)
    return engine, step


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
        self.ckpt_path = checkpoint_path(cfg)
        self.last_saved = self.step if cfg.resume else None
        self.saved_at, self.skipped, self.stopping = -1, 0, False
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
            " ".join(f"{k}={v!r}" for k, v in s.run_config.items()), 100, subsequent_indent="  "))
        mode = (f"{grid.stages} pipeline stages (layers {self.engine.layers_per_stage}) x "
                f"{grid.replicas} replica(s), {cfg.micro_batches} micro-batches, {cfg.schedule}"
                if grid.stages > 1 else "data parallel")
        self.log.info(self.lr_summary())
        self.log.info(f"mpinn train: {self.comm.size} rank(s) [{self.comm.library_version()}], "
                      f"{mode}, network {self.arch.describe()} ({self.arch.n_params:,} "
                      f"parameters, {self.arch.loss}), {s.n_rows} rows, global batch "
                      f"{cfg.batch_size} -> {self.spe} steps/epoch; kernels ready in "
                      f"{s.jit_s:.2f} s")
        if cfg.overwrite:  # every input is checked by now: the old run may go
            self.comm.checked(lambda: clear_run(cfg.run_dir) if self.comm.is_root else None)
        self.log.open_metrics(os.path.join(cfg.run_dir, "metrics.jsonl"), append=cfg.resume)

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
            for k in range(first, self.spe):
                if self.step >= self.max_steps or self.stopping:
                    break
                self.train_step(batches, k, epoch)
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
        if cfg.shuffle != "global":
            return data.EpochBatches(s.x, s.y, self.counts, cfg.shuffle == "rank", cfg.seed,
                                     epoch, grid.replica,
                                     s.plan.owned_rows() if dropout else None)
        t0 = time.perf_counter()
        ex, ey = data.global_shuffle(self.comm, s.x, s.y, s.n_rows, cfg.batch_size, cfg.seed,
                                     epoch)
        rows = data.global_shuffle_rows(s.n_rows, cfg.batch_size, cfg.seed, epoch, grid.replica,
                                        grid.replicas) if dropout else None
        self.shuffle_seconds += time.perf_counter() - t0
        return data.EpochBatches(ex, ey, self.counts, False, cfg.seed, epoch, grid.replica, rows)

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
        self.engine.timeline.add("checkpoint", t0, time.perf_counter())

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
            timeline.write(comm, self.cfg.timeline)
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


def checkpoint_path(cfg):
    return os.path.join(cfg.run_dir, CHECKPOINT_NAME)


def start_checkpoint(cfg, log):
    """The checkpoint a run starts from (rank 0 only), or None. On --resume a damaged or missing
    checkpoint.h5 falls back to the newest intact step checkpoint (--keep-checkpoints), saying so."""
    if not cfg.resume:
        return checkpoint.load(cfg.init) if cfg.init else None
    path = checkpoint_path(cfg)
    try:
        if not os.path.exists(path):
            raise UsageError(f"--resume: no checkpoint at {path}")
        return checkpoint.load(path)
    except UsageError as problem:
        for older in sorted(glob.glob(os.path.join(cfg.run_dir, "checkpoints", "step-*.h5")),
                            reverse=True):
            try:
                ckpt = checkpoint.load(older)
            except UsageError:
                continue
            log.warn(f"{problem}; resuming from {older} (step {ckpt.global_step}) instead")
            return ckpt
        raise


def check_mode(cfg, grid):
    """Options that the rank grid rules out (every rank decides the same)."""
    who = "ranks" if grid.stages == 1 else "pipeline replicas"
    if cfg.shuffle == "global" and grid.stages > 1:
        raise UsageError("--shuffle global works in data-parallel mode only for now; use "
                         "--shuffle rank or none with --pipeline-stages")
    if cfg.batch_size < grid.replicas:
        raise UsageError(f"--batch-size {cfg.batch_size} is smaller than the number of {who} "
                         f"({grid.replicas}); each needs at least one row of each full batch")
    if cfg.accumulate > 1:
        if grid.stages > 1:
            raise UsageError("--accumulate is for data-parallel mode; a pipeline already splits "
                             "each batch (--micro-batches)")
        if cfg.overlap_mb:
            raise UsageError("--accumulate and --overlap-mb exclude each other")
        share = cfg.batch_size // grid.replicas
        if share < cfg.accumulate:
            raise UsageError(f"--accumulate {cfg.accumulate}: each rank's share of a global batch "
                             f"is {share} rows, fewer than the pieces asked for")


def architecture(cfg, explicit, ckpt, n_features, n_outputs):
    """The network to train: from the checkpoint (conflicting explicit options are errors) or cfg."""
    if ckpt is None:
        return Architecture((n_features,) + cfg.hidden_sizes() + (n_outputs,), cfg.activation,
                            cfg.output_activation, cfg.loss)
    arch = ckpt.arch
    given = {"hidden": cfg.hidden_sizes(), "activation": cfg.activation, "loss": cfg.loss,
             "output_activation": cfg.output_activation}
    have = {"hidden": arch.sizes[1:-1], "activation": arch.activation, "loss": arch.loss,
            "output_activation": arch.output_activation}
    for key in given:
        if key in explicit and given[key] != have[key]:
            raise UsageError(f"--{key.replace('_', '-')} {given[key]} conflicts with the checkpoint's "
                             f"{have[key]}; drop the option to use the checkpoint's architecture")
    if arch.sizes[0] != n_features:
        raise UsageError(f"the checkpoint's network takes {arch.sizes[0]} input features; the data "
                         f"has {n_features}")
    if n_outputs is not None and arch.sizes[-1] != n_outputs and not arch.loss_fn.integer_labels:
        raise UsageError(f"the checkpoint's network has {arch.sizes[-1]} outputs; the data's "
                         f"targets have {n_outputs}")
    return arch


def raise_usage(message):
    raise UsageError(message)


def raise_run(message, exit_code):
    raise RunError(message, exit_code)
