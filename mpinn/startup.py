"""Everything a training run decides before its first step, every phase agreed by all ranks
(comm.checked): the run folder (created, locked, not an old run's unless --resume/--overwrite),
the start checkpoint (with --resume: its own data and options, a damaged file's fallback), this
rank's data slice, the class count and the network (checked against memory), validation data,
the learning-rate schedule, and the engine, warmed up. set_up returns it all as a Setup."""
import dataclasses
import functools
import glob
import os
import time
from dataclasses import dataclass

import numpy as np

from . import checkpoint, data, lr
from .checkpoint import CHECKPOINT_NAME
from .config import parse_hidden
from .errors import AgreedExit, UsageError
from .losses import LOSSES
from .model import Architecture, init_params
from .outputs import (RunDirLock, check_new_run, check_side_output, prepare_run_dir,
                      recover_set_aside)
from .plan import BatchPlan, Grid, even_part
from .runtime.faults import FaultInjector
from .runtime.process import available_memory_bytes
from .runtime.threads import limit_threads, oversubscription
from .runtime.timeline import Timeline, is_trace
from .session import (Evaluator, broadcast_checkpoint, check_labels, data_paths, load_split,
                      make_engine)


EVAL_ROWS = 1024  # rows per forward pass when evaluating


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
    stream: object = None    # data.Stream when the inputs are read from the file as training goes


def set_up(cfg, explicit, comm, log):
    """Threads, rank grid, run folder, start checkpoint, this rank's data, network and engine.
    When set-up fails on every rank's agreement (bad input), what it already holds beyond memory
    (the run folder's lock, the engine's shared window and communicators) is released: a sweep
    goes on to its next trial in the same processes."""
    held = []
    try:
        return _set_up(cfg, explicit, comm, log, held)
    except AgreedExit:
        for release in reversed(held):
            release()
        raise


def _set_up(cfg, explicit, comm, log, held):
    limit_threads(cfg.threads)
    warning = oversubscription(comm.node_size(), cfg.threads)
    if warning and comm.is_root:
        log.warn(warning)
    faults = FaultInjector.from_env(comm.rank)
    grid = comm.checked(Grid, cfg.pipeline_stages, comm.size, comm.rank)
    if cfg.resume == "auto":
        cfg = auto_resume(cfg, comm, log)
    lock = comm.checked(lambda: claim_run_dir(cfg) if comm.is_root else None)
    if lock is not None:
        held.append(lock.release)
        if lock.note:
            log.warn(lock.note)
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
    stream = comm.checked(streaming, cfg, train_path, cols, grid, comm.node_size())
    n_rows, n_features, n_targets, x, y = load_split(
        comm, train_path, cols, train_selections, grid.replicas, grid.is_first and not stream,
        grid.is_last, "ranks" if grid.stages == 1 else "pipeline replicas")
    if stream:
        stream.labels = comm.checked(lambda: data.read_rows(
            train_path, cols, [(slice(0, n_rows), n_rows)], n_targets, want_x=False)[1])
    t_load = time.perf_counter() - t_load
    plan = BatchPlan(n_rows, cfg.batch_size, grid.replica, grid.replicas)
    n_outputs = (class_count(comm, cfg, ckpt, y, train_path, plan)
                 if LOSSES[loss].integer_labels else n_targets)
    arch = comm.checked(architecture, cfg, explicit, ckpt, n_features, n_outputs)
    comm.checked(check_memory, cfg, arch, grid,
                 -(-int(plan.local_counts().max()) // cfg.accumulate), comm.node_size())
    evaluate = validation(cfg, comm, grid, cols, val_path, train_path, n_features, arch)
    engine, step = build_engine(cfg, comm, grid, arch, plan, ckpt, log, bool(evaluate))
    held.append(engine.close)
    lr_of = comm.checked(learning_rates, cfg, plan, bool(evaluate))
    loop_state = dict(ckpt.state) if ckpt is not None and cfg.resume else {}
    saved_config = ckpt.config if ckpt is not None else None
    del ckpt  # the engine holds what this rank needs (a stage: its slice only)
    t0 = time.perf_counter()
    warm_x = x if not stream else comm.checked(stream.first_rows, plan)
    comm.in_cache_order(lambda: engine.warmup(warm_x, y))
    jit_s = time.perf_counter() - t0
    if cfg.timeline:
        inputs = [*data.data_files(train_path), *(data.data_files(val_path) if val_path else [])]
        comm.checked(check_side_output, cfg.timeline, "--timeline", cfg.overwrite, inputs,
                     cfg.run_dir, is_trace if cfg.resume else lambda path: False)
        engine.timeline = Timeline()
    run_config = {**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "data": train_path,
                  "val_data": val_path or "", "ranks": comm.size,
                  "data_identity": comm.checked(lambda: {**data.spec_identity(train_path),
                                                         **data.spec_identity(val_path)}
                                                if comm.is_root else {}),
                  "class_names": names_of_classes(comm, cfg, saved_config, train_path, arch)}
    return Setup(cfg, grid, faults, lock, train_path, val_path, arch, n_rows, x, y, plan,
                 evaluate, engine, step, run_config, t_load,
                 sum(a.nbytes for a in (x, y) if a is not None), jit_s, lr_of, loop_state, stream)


def names_of_classes(comm, cfg, saved_config, train_path, arch):
    """The class names a checkpoint carries (predict writes them): the start checkpoint's, else
    those stored with the training labels; None for regression or unnamed classes."""
    if not arch.loss_fn.integer_labels:
        return None
    names = (saved_config or {}).get("class_names") or comm.checked(
        lambda: data.class_names(train_path, cfg.y_key) if comm.is_root else None)
    names = comm.bcast_json(names)
    return names if names and len(names) == arch.sizes[-1] else None


def streaming(cfg, path, cols, grid, ranks_on_node):
    """A data.Stream when this rank's slice of the inputs is larger than --memory-budget (by
    default half the node's available memory shared by its ranks), else None."""
    with data.open_h5(path) as f:
        n_rows, n_features, _ = data.inspect(f, path, cols)
    rows = int(BatchPlan(n_rows, cfg.batch_size, grid.replica, grid.replicas).local_counts().sum())
    budget = (cfg.memory_budget * 2**20 if cfg.memory_budget else
              available_memory_bytes() / 2 / max(ranks_on_node, 1))
    row_bytes = n_features * 4
    if not budget or rows * row_bytes <= budget:
        return None
    if grid.stages > 1:
        raise UsageError(f"this rank's {rows * row_bytes / 2**20:,.0f} MiB of inputs exceed "
                         f"--memory-budget ({budget / 2**20:,.0f} MiB): streaming is data parallel "
                         "only; raise the budget, or use more replicas")
    return data.Stream(path, cols.x_key, max(1, int(budget // 3 // row_bytes)))


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


def auto_resume(cfg, comm, log):
    """--resume auto: continue when RUN_DIR holds a checkpoint, else start a new run there (what a
    job that may be requeued asks for; leftovers of an attempt that never checkpointed go)."""
    found = comm.bcast_(np.array([int(comm.is_root and bool(saved_checkpoints(cfg.run_dir)))],
                                 np.int64))[0]
    log.info("mpinn train: --resume auto: " + ("continuing the run in" if found else
                                                "no checkpoint yet, a new run in") +
             f" {cfg.run_dir}")
    return dataclasses.replace(cfg, resume=bool(found), overwrite=not found)


def saved_checkpoints(run_dir):
    return [p for p in [os.path.join(run_dir, CHECKPOINT_NAME)] + glob.glob(
        os.path.join(run_dir, "checkpoints", "step-*.h5")) if os.path.exists(p)]


def claim_run_dir(cfg):
    """Rank 0: create and lock RUN_DIR; a new run may not land on an old one unasked."""
    prepare_run_dir(cfg.run_dir)
    lock = RunDirLock(cfg.run_dir)
    try:
        lock.note = recover_set_aside(cfg.run_dir)
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
    # the data files as this command line means them: --data '' is the bundled digits (so a job
    # file's empty DATA resumes a run on the bundled data), its --val-data '' the bundled test set
    resolved = dict(zip(("data", "val_data"), (p or "" for p in data_paths(cfg))))
    for key in KEPT_ON_RESUME:
        if key not in saved:
            continue
        mine, theirs = resolved.get(key, getattr(cfg, key)), saved[key]
        if key in explicit and not same_setting(key, mine, theirs):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {mine!r} differs from the run's {theirs!r}: --resume "
                             "continues a run on its own data and options. Drop the option, or "
                             "start a new run (--overwrite, or another --run-dir)")
        updates[key] = theirs
    check_data_identity(saved)
    return dataclasses.replace(cfg, **updates)


def check_data_identity(saved):
    """The run's data files must be the ones it started on (same size and fingerprint): a file
    replaced under the same name is refused, as a different --data is."""
    for path, identity in saved.get("data_identity", {}).items():
        now = data.file_identity(path)
        if now != identity:
            raise UsageError(f"the run's data file {path} has changed since the run started "
                             f"({identity[0]:,} bytes, fingerprint {identity[1]}; now {now[0]:,} "
                             f"bytes, {now[1]}): --resume continues a run on its own data. "
                             "Restore the file, or start a new run (--overwrite, or another "
                             "--run-dir)")


def same_setting(key, mine, theirs):
    if key in ("data", "val_data"):
        files = lambda spec: [os.path.realpath(p) for p in data.data_files(spec)]  # noqa: E731
        return bool(mine) == bool(theirs) and (not mine or files(mine) == files(theirs))
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
    local = np.unique(y) if y is not None else np.zeros(0, np.int64)
    values = np.unique(comm.allgather_ints(local))
    comm.checked(check_two_classes, values, n, path, cfg.y_key)
    if n is None:
        top = int(values.max())
        comm.checked(check_sparse_labels, y, top, values.size, path, cfg.y_key, plan)
        n = top + 1
    comm.checked(check_labels, y, n, path, plan.owned_rows)
    return n


def check_two_classes(values, n, path, y_key):
    """A classifier needs two classes at least: one class trains to loss 0 and accuracy 1 and
    learns nothing."""
    if n is not None and n < 2:
        raise UsageError(f"{n} class: cross_entropy needs at least 2 classes (for one target "
                         "value use --loss mse)")
    if values.size == 1:
        raise UsageError(f"{path}:{y_key} holds one class only (every label is {values[0]}): a "
                         "classifier learns nothing from it; check --data and --y-key, or use "
                         "--loss mse for a regression target")


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
                          EVAL_ROWS if evaluates else 0, cfg.overlap_mb, cfg.accumulate,
                          cfg.shard_optimizer, cfg.allreduce)
    engine.clip_grad_norm = cfg.clip_grad_norm
    engine.set_dropout(cfg.dropout, cfg.seed)
    return engine, step


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
        for older in reversed(checkpoint.step_checkpoints(os.path.join(cfg.run_dir,
                                                                       "checkpoints"))):
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
