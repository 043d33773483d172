"""The assembly of a training run: each part built from its own section of the options, every
phase agreed by all ranks (comm.checked), then handed to the Trainer, which reads no options.

    run folder      RunDir: created, locked, not an old run's unless --resume/--overwrite (run)
    start weights   the checkpoint (--resume: its own data and options; --init), else fresh (run)
    data            this rank's slice, or a stream of it, as a BatchSource (data, schedule)
    network         the class count and the architecture, checked against memory (model)
    engine          data parallel or pipeline, its gradient reducer, an optimizer that owns its
                    learning-rate schedule, warmed up (parallel, optim, schedule)
    hooks           metrics, validation, early stopping, checkpoints, the summary (run, safety)
"""
import time
from dataclasses import dataclass, replace

import numpy as np

from . import data, hooks, lr, metrics, network, resume
from .config import Resume
from .data.scaling import Moments, Scale, Scaling, merged_across, moments_in_chunks, spread_warning
from .errors import AgreedExit, UsageError, raise_usage
from .model import init_params
from .outputs import check_side_output
from .plan import BatchPlan, Grid, even_part
from .rundir import RunDir
from .runtime.faults import FaultInjector
from .runtime.process import available_memory_bytes
from .runtime.signals import NoStopRequest, StopRequest
from .runtime.tensorboard import require_writer
from .runtime.threads import limit_threads, oversubscription
from .runtime.timeline import Timeline, is_trace
from .runtime.watchdog import NullWatchdog, Watchdog
from .session import (Evaluator, broadcast_checkpoint, check_labels, check_metrics, data_paths,
                      load_split, make_engine, own_weights)
from .trainer import Guard, LoopState, Trainer



@dataclass
class Startup:
    """Figures of the start-up for the summary."""
    load_s: float         # this rank's shard read time
    shard_bytes: int
    jit_s: float
    stages: int


@dataclass
class Inputs:
    """The training data as this rank holds it: the paths, the row plan, its rows (x, y; None
    where it reads none or streams) and the stream's chunk rows (0: in memory)."""
    train_path: str
    val_path: str
    cols: object
    plan: BatchPlan
    n_features: int
    n_targets: int
    x: np.ndarray
    y: np.ndarray
    chunk_rows: int
    labels: np.ndarray    # streaming: all of the file's labels
    load_s: float
    scaling: Scaling      # applied to x, y and labels already; validation rows get it too
    spread_warning: str = None  # unscaled inputs of very different scales
    val_cols: object = None     # the validation rows' Columns (a part of the training file's)
    w: np.ndarray = None        # the rows' own weights (--weight-key): this rank's, all streamed


def assemble(options, explicit, comm, log, user_hooks=()):
    """The Trainer of this run, every part built. When set-up fails on every rank's agreement
    (bad input), what it already holds beyond memory (the run folder's lock, the engine's shared
    window and communicators) is released: a sweep goes on to its next trial in the same
    processes."""
    held = []
    try:
        return _assemble(options, explicit, comm, log, held, user_hooks)
    except AgreedExit:
        for release in reversed(held):
            release()
        raise


def _assemble(options, explicit, comm, log, held, user_hooks):
    threads(options.parallel.threads, comm, log)
    faults = FaultInjector.from_env(comm.rank)
    grid = comm.checked(Grid, options.parallel.pipeline_stages, comm.size, comm.rank)
    if options.run.resume is Resume.AUTO:
        options = resume.auto_resume(options, comm, log)
    run_dir = RunDir(options.run.run_dir)
    note = comm.on_root(run_dir.claim, options.run.resume is Resume.YES, options.run.overwrite)
    held.append(run_dir.release)
    if note:
        log.warn(note)
    resumed = options.run.resume is Resume.YES
    ckpt = broadcast_checkpoint(comm, lambda: resume.start_checkpoint(options.run, run_dir, log))
    if resumed:
        options = comm.checked(resume.resumed_options, options, explicit, ckpt)
    comm.checked(check_mode, options, grid)
    if options.run.tensorboard:  # before any work: a missing writer is a clear error
        comm.on_root(require_writer)
    inputs = read_inputs(options, comm, grid, ckpt, faults)
    if inputs.spread_warning and comm.is_root:
        log.warn(inputs.spread_warning)
    arch = network.build(options, explicit, comm, grid, ckpt, inputs)
    warning = comm.on_root(network.regression_warning, options, ckpt, arch, inputs.plan.n_rows,
                           inputs.train_path)
    if warning:  # rank 0's alone
        log.warn(warning)
    evaluate = validation(options, comm, grid, inputs, arch)
    engine, step = build_engine(options, comm, grid, arch, inputs.plan, ckpt, log, bool(evaluate))
    held.append(engine.close)
    saved_state = dict(ckpt.state) if ckpt is not None and resumed else {}
    saved_config = ckpt.config if ckpt is not None else None
    del ckpt  # the engine holds what this rank needs (a stage: its slice only)
    batches = batch_source(options, comm, inputs)
    t0 = time.perf_counter()
    warm_x = comm.checked(batches.first_rows)
    comm.in_cache_order(lambda: engine.warmup(warm_x, inputs.y))
    startup = Startup(inputs.load_s, sum(a.nbytes for a in (inputs.x, inputs.y) if a is not None),
                      time.perf_counter() - t0, grid.stages)
    timeline(options, comm, engine, inputs, run_dir)
    run_config = {**options.flat(), "data": inputs.train_path,
                  "val_data": "" if inputs.val_cols.rows is not None else inputs.val_path or "",
                  "ranks": comm.size,
                  "data_identity": comm.on_root(lambda: {
                      **data.spec_identity(inputs.train_path),
                      **data.spec_identity(inputs.val_path)}, default={}),
                  "class_names": network.names_of_classes(comm, options, saved_config, inputs,
                                                          arch)}
    spe = inputs.plan.steps_per_epoch
    state = LoopState(step=step, start_step=step, total_steps=total_updates(options, inputs.plan),
                      steps_per_epoch=spe, epochs=options.schedule.epochs,
                      last_saved=step if resumed else None)
    lines = announcement(options, comm, engine, arch, inputs, startup, state)
    hook_list = loop_hooks(options, run_config, lines, evaluate, saved_state, startup, resumed,
                           user_hooks, inputs.scaling, engine.optimizer.schedule.plateau)
    return Trainer(engine, batches, hook_list, run_dir, comm=comm, log=log, state=state,
                   guard=guard(options.safety, comm, log, faults))


def threads(n, comm, log):
    limit_threads(n)
    warning = oversubscription(comm.node_size(), n)
    if warning and comm.is_root:
        log.warn(warning)


def guard(safety, comm, log, faults):
    stop = (StopRequest(safety.signal_grace, comm.rank) if safety.checkpoint_on_signal
            else NoStopRequest())
    watchdog = (Watchdog(comm, safety.stall_warning, safety.stall_timeout, log)
                if safety.stall_warning or safety.stall_timeout else NullWatchdog())
    return Guard(stop, watchdog, faults)


def loop_hooks(options, run_config, lines, evaluate, saved_state, startup, resumed, user_hooks,
               scaling, plateau):
    """The hooks of a training run, in the order they act at each event: a user's see the
    epoch's record whole (validation, early stopping) before the checkpoint is written."""
    checkpoints = hooks.Checkpoints(run_config, options.run.seed, options.run.keep_checkpoints,
                                    options.run.overwrite, scaling)
    sched = options.schedule
    return [
        hooks.Announcement(run_config, lines),
        hooks.NonFinitePolicy(skip=options.safety.on_nonfinite == "skip"),
        *([hooks.Validation(evaluate)] if evaluate else []),
        hooks.EarlyStopping(sched.early_stop, sched.early_stop_delta, checkpoints, saved_state,
                            sched.monitor),
        *([hooks.PlateauSchedule(plateau, sched.monitor, saved_state)] if plateau else []),
        hooks.Metrics(options.run.log_every, resumed, bool(options.optim.clip_grad_norm)),
        *([hooks.TensorBoard(options.run.tensorboard, resumed)] if options.run.tensorboard
          else []),
        hooks.ReplicaCheck(options.safety.check_every),
        *user_hooks,
        checkpoints,
        hooks.Summary(startup, options.run.timeline, options.parallel.micro_batches),
    ]


def read_inputs(options, comm, grid, ckpt, faults):
    """This rank's part of the training data (or, when it is too large, the plan to stream it)."""
    fraction = options.data.val_fraction
    train_path, val_path = comm.checked(data_paths, options.data.data, options.data.val_data,
                                        bool(fraction))
    loss = ckpt.arch.loss if ckpt else options.model.loss
    cols = val_cols = data.Columns(options.data.x_key, options.data.y_key, loss,
                                   w_key=options.data.weight_key,
                                   dtype=ckpt.arch.dtype if ckpt else options.model.dtype)
    t_load = time.perf_counter()
    n_rows, n_features = comm.checked(shape_of, train_path, cols)
    if fraction:  # the file's rows split in two; each part read as a file of its own rows
        train_rows, val_rows = comm.checked(data.split_rows, n_rows, fraction, options.run.seed,
                                            grid.replicas)
        cols, val_cols = replace(cols, rows=train_rows), replace(cols, rows=val_rows)
        val_path, n_rows = train_path, len(train_rows)
    plan = BatchPlan(n_rows, options.schedule.batch_size, grid.replica, grid.replicas)
    chunk_rows = comm.checked(streaming, options.data.memory_budget, plan, n_features, grid,
                              comm.node_size())

    def train_selections(n):
        faults.at("load")
        return data.plan_selections(plan)
    n_rows, n_features, n_targets, x, y = load_split(
        comm, train_path, cols, train_selections, grid.replicas,
        grid.is_first and not chunk_rows, grid.is_last,
        "ranks" if grid.stages == 1 else "pipeline replicas")
    labels = comm.checked(lambda: data.read_rows(
        train_path, cols, [(slice(0, n_rows), n_rows)], n_targets, want_x=False)[1]
    ) if chunk_rows else None
    w = own_weights(comm, train_path, cols, [(slice(0, n_rows), n_rows)] if chunk_rows
                    else data.plan_selections(plan), grid.is_last)
    # streamed: each rank summarises its block of the file's rows (and of the labels)
    first, count = even_part(n_rows, comm.size, comm.rank)
    block = slice(first, first + count)
    stream = (train_path, cols, block, chunk_rows) if chunk_rows else None
    scaling, warning = fit_scaling(options.data, loss, comm, ckpt, x,
                                   y if labels is None else labels[block], n_features,
                                   n_targets, stream)
    scaling.inputs_(x)
    scaling.targets_(y)
    scaling.targets_(labels)
    return Inputs(train_path, val_path, cols, plan, n_features, n_targets, x, y,
                  chunk_rows, labels, time.perf_counter() - t_load, scaling, warning, val_cols, w)


def fit_scaling(opts, loss, comm, ckpt, x, y, n_features, n_targets, stream):
    """(Scaling, warning or None): the start checkpoint's own (--resume, --init), or the moments
    of every rank's training rows merged across ranks (data/scaling.py). x: this rank's rows in
    memory, or None (streamed: its block of the file is read chunk by chunk; or a pipeline stage
    that reads none); y: its targets (mse) or None."""
    kinds = (opts.scale_inputs, opts.scale_targets)
    if kinds[1] != "none" and loss != "mse":
        comm.checked(raise_usage, f"--scale-targets {kinds[1]} is for --loss mse targets; "
                                  "class labels are not scaled")
    if ckpt is not None:
        own = ckpt.scaling.kinds()
        if kinds not in (own, ("none", "none")):
            comm.checked(raise_usage, f"--scale-inputs {kinds[0]} --scale-targets {kinds[1]} "
                                      f"differ from the start checkpoint's ({own[0]}, {own[1]}): "
                                      "its weights expect its own")
        return ckpt.scaling, None
    if x is None and stream is not None and kinds[0] != "none":
        x_moments = comm.checked(_streamed_moments, *stream)
    else:
        x_moments = Moments.of(x) if x is not None and len(x) else None
    features = merged_across(comm, x_moments, n_features)
    scaling = Scaling(Scale.fitted(kinds[0], features) if kinds[0] != "none" else None)
    if kinds[1] != "none":
        targets = merged_across(comm, Moments.of(y) if y is not None and len(y) else None,
                                n_targets)
        scaling.targets = Scale.fitted(kinds[1], targets)
    warning = spread_warning(features) if kinds[0] == "none" and features.count else None
    return scaling, warning


def _streamed_moments(path, cols, rows, chunk_rows):
    source = data.RowSource(path, cols.x_key, cols.rows, cols)
    try:
        return moments_in_chunks(source.read, rows, chunk_rows)
    finally:
        source.close()


def batch_source(options, comm, inputs):
    """Where the loop's batches come from: the stream, the global shuffle, or memory. Every rank
    knows the rows carry their own weights, also a pipeline stage that holds none of them."""
    source = _batch_source(options, comm, inputs)
    source.own_weights = bool(inputs.cols.w_key)  # the epoch's weight sums are collective
    return source


def _batch_source(options, comm, inputs):
    shuffle, seed, plan = options.data.shuffle, options.run.seed, inputs.plan
    dropout = options.model.dropout > 0  # dropout's masks are keyed by file row: say which rows
    if inputs.chunk_rows:
        return data.StreamedSource(inputs.train_path, inputs.cols, inputs.chunk_rows,
                                   inputs.labels, plan, shuffle, seed, dropout,
                                   inputs.scaling.inputs_, inputs.w)
    if shuffle == "global":
        return data.GlobalShuffleSource(comm, inputs.x, inputs.y, plan, seed, dropout, inputs.w)
    return data.InMemorySource(inputs.x, inputs.y, plan, shuffle == "rank", seed,
                               plan.owned_rows() if dropout else None, inputs.w)


def shape_of(path, cols):
    """(rows, features) of a training file, checked as every reader checks it."""
    with data.open_h5(path, cols) as f:
        n_rows, n_features, _ = data.inspect(f, path, cols)
    return n_rows, n_features


def streaming(mib, plan, n_features, grid, ranks_on_node):
    """The rows of a streamed chunk when this rank's slice of the inputs is larger than
    --memory-budget (mib; 0: half the node's available memory shared by its ranks), else 0."""
    rows = int(plan.local_counts().sum())
    budget = mib * 2**20 if mib else available_memory_bytes() / 2 / max(ranks_on_node, 1)
    row_bytes = n_features * 4
    if not budget or rows * row_bytes <= budget:
        return 0
    if grid.stages > 1:
        raise UsageError(f"this rank's {rows * row_bytes / 2**20:,.0f} MiB of inputs exceed "
                         f"--memory-budget ({budget / 2**20:,.0f} MiB): streaming is data parallel "
                         "only; raise the budget, or use more replicas")
    return max(1, int(budget // 3 // row_bytes))


def total_updates(options, plan):
    epochs, steps = options.schedule.epochs, options.schedule.steps
    spe = plan.steps_per_epoch
    return epochs * spe if steps == 0 else min(steps, epochs * spe)


def learning_rates(options, plan, has_validation):
    """The run's learning-rate schedule (lr.py), after checking the schedule's options."""
    sched, optim = options.schedule, options.optim
    total = total_updates(options, plan)
    if sched.warmup_steps and sched.warmup_steps >= total:
        raise UsageError(f"--warmup-steps {sched.warmup_steps} must be fewer than the run's "
                         f"{total} updates")
    if sched.early_stop and not has_validation:
        raise UsageError("--early-stop needs validation data (--val-data or --val-fraction)")
    if sched.lr_schedule == "plateau" and not has_validation:
        raise UsageError("--lr-schedule plateau needs validation data (--val-data or "
                         "--val-fraction)")
    watched = sched.monitor.removeprefix("val_")
    if watched not in ("loss", "accuracy") and watched not in options.run.metrics:
        raise UsageError(f"--monitor {sched.monitor} needs --metrics {watched}")
    if options.run.metrics and not has_validation:
        raise UsageError("--metrics are computed on validation data (--val-data or "
                         "--val-fraction)")
    base = lr.base_lr(optim.lr, optim.lr_scale, sched.batch_size, optim.lr_ref_batch)
    plateau = (lr.Plateau(base, metrics.MONITORED[sched.monitor], sched.plateau_factor,
                          sched.plateau_patience, sched.plateau_cooldown, sched.plateau_threshold,
                          sched.min_lr) if sched.lr_schedule == "plateau" else None)
    return lr.Schedule(base, sched.lr_schedule, sched.warmup_steps, total, sched.min_lr,
                       sched.step_size, sched.gamma, plateau)


def validation(options, comm, grid, inputs, arch):
    """An Evaluator over this reader's block of the validation data, or None without one."""
    val_path, train_path, n_features = inputs.val_path, inputs.train_path, inputs.n_features
    cols = inputs.val_cols
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
                     lambda: cols.file_rows(first + np.arange(len(vy))))
    inputs.scaling.inputs_(vx)
    inputs.scaling.targets_(vy)
    names = options.run.metrics
    check_metrics(comm, names, arch, vy, val_path)
    vw = own_weights(comm, val_path, cols, data.block_selections(n_val, grid.replica,
                                                                 grid.replicas),
                     grid.is_last, optional=True)
    return Evaluator(comm, even_part(n_val, grid.replicas, grid.replica)[1], vx, vy, arch,
                     names, inputs.scaling, vw)


def build_engine(options, comm, grid, arch, plan, ckpt, log, evaluates):
    """This rank's engine with the start weights (rank 0's, broadcast), an optimizer that owns
    the run's learning-rate schedule and, when resuming, the optimizer state; returns (engine,
    optimizer steps already made)."""
    params = ckpt.params if ckpt else init_params(arch, options.run.seed,
                                                  scheme=options.model.weight_init)
    comm.bcast_(params)  # one source of truth for the initial weights: rank 0's
    o = options.optim
    schedule = comm.checked(learning_rates, options, plan, evaluates)
    optimizer = dict(name=o.optimizer, lr=schedule.base, momentum=o.momentum,
                     nesterov=o.nesterov, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
                     weight_decay=o.weight_decay, alpha=o.alpha,
                     trust_coefficient=o.trust_coefficient, trust_clip=o.trust_clip,
                     schedule=schedule)
    step, opt_state = 0, None
    if options.run.resume is Resume.YES:
        step, opt_state = ckpt.global_step, (ckpt.optimizer_step, ckpt.optimizer_state)
        if ckpt.config.get("ranks") != comm.size and options.data.shuffle == "rank":
            log.info(f"note: resuming on {comm.size} ranks a run checkpointed on "
                     f"{ckpt.config.get('ranks')}: shuffled data order differs from an "
                     "uninterrupted run")
    engine = comm.checked(make_engine, comm, grid, arch, params, int(plan.local_counts().max()),
                          optimizer=optimizer, opt_state=opt_state,
                          eval_rows=network.EVAL_ROWS if evaluates else 0,
                          parallel=options.parallel)
    engine.clip_grad_norm = o.clip_grad_norm
    engine.set_dropout(options.model.dropout, options.run.seed)
    return engine, step


def check_mode(options, grid):
    """Options that the rank grid rules out (every rank decides the same)."""
    who = "ranks" if grid.stages == 1 else "pipeline replicas"
    batch_size, accumulate = options.schedule.batch_size, options.parallel.accumulate
    if options.data.shuffle == "global" and grid.stages > 1:
        raise UsageError("--shuffle global works in data-parallel mode only for now; use "
                         "--shuffle rank or none with --pipeline-stages")
    if batch_size < grid.replicas:
        raise UsageError(f"--batch-size {batch_size} is smaller than the number of {who} "
                         f"({grid.replicas}); each needs at least one row of each full batch")
    if accumulate > 1:
        if grid.stages > 1:
            raise UsageError("--accumulate is for data-parallel mode; a pipeline already splits "
                             "each batch (--micro-batches)")
        if options.parallel.overlap_mb:
            raise UsageError("--accumulate and --overlap-mb exclude each other")
        share = batch_size // grid.replicas
        if share < accumulate:
            raise UsageError(f"--accumulate {accumulate}: each rank's share of a global batch "
                             f"is {share} rows, fewer than the pieces asked for")


def timeline(options, comm, engine, inputs, run_dir):
    """--timeline: checked like every output beside a run, then the engine records phases."""
    path = options.run.timeline
    if not path:
        return
    files = [*data.data_files(inputs.train_path),
             *(data.data_files(inputs.val_path) if inputs.val_path else [])]
    resumed = options.run.resume is Resume.YES
    comm.checked(check_side_output, path, "--timeline", options.run.overwrite, files,
                 run_dir.ours(), is_trace if resumed else lambda p: False)
    engine.timeline = Timeline()


def announcement(options, comm, engine, arch, inputs, startup, state):
    """The lines that open a run's output: learning rate, streaming, the run's shape."""
    o, sched = options.optim, options.schedule
    schedule = engine.optimizer.schedule
    rule = ("" if o.lr_scale == "none" else f" = {o.lr:g} with {o.lr_scale} scaling for "
            f"global batch {sched.batch_size} vs {o.lr_ref_batch}")
    warm = f", warm-up {sched.warmup_steps} updates" if sched.warmup_steps else ""
    lines = [f"mpinn train: learning rate {schedule.base:g}{rule}, {sched.lr_schedule} schedule"
             f"{warm} over {state.total_steps} updates"
             + (f"; gradients clipped to norm {o.clip_grad_norm:g}" if o.clip_grad_norm else "")]
    scaled = [f"{what} scaled ({kind})" for what, kind in zip(("inputs", "targets"),
                                                               inputs.scaling.kinds())
              if kind != "none"]
    if scaled:
        lines.append(f"mpinn train: {' and '.join(scaled)} by statistics of the whole training "
                     "set, kept in the checkpoint")
    if inputs.val_cols.rows is not None:
        n_val = len(inputs.val_cols.rows)
        lines.append(f"mpinn train: validation on {n_val} of the {n_val + inputs.plan.n_rows} "
                     f"rows of {inputs.train_path} (--val-fraction {options.data.val_fraction:g}"
                     f", seed {options.run.seed}), training on the other {inputs.plan.n_rows}")
    if inputs.chunk_rows:
        lines.append(f"mpinn train: inputs streamed from {inputs.train_path} in chunks of "
                     f"{inputs.chunk_rows:,} rows read ahead (this rank's slice is larger than "
                     "--memory-budget)")
    lines.append(f"mpinn train: {comm.size} rank(s) [{comm.library_version()}], "
                 f"{engine.describe()}, network "
                 f"{arch.describe()} ({arch.n_params:,} parameters, {arch.loss}), "
                 f"{inputs.plan.n_rows} rows, global batch {sched.batch_size} -> "
                 f"{state.steps_per_epoch} steps/epoch; kernels ready in {startup.jit_s:.2f} s")
    return lines
