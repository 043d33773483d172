"""The training loop: batch -> local gradient -> Allreduce -> the same update on every replica.

    mpirun -n 8 python -m mpinn train --data train.h5 --val-data test.h5 --hidden 512,512 \\
        --epochs 10 --run-dir runs/a
    mpirun -n 8 python -m mpinn train --pipeline-stages 2 --micro-batches 8 ...   # 2 stages x 4
    srun --mpi=pmi2 python -m mpinn train ...         (inside a SLURM allocation)
    python -m mpinn train                               (1 rank, bundled digits data)

Each data-parallel reader (a rank, or a pipeline replica) reads only its part of every global
batch (data.BatchPlan); its gradient is of (sum of its rows' losses) / (global batch rows), so the
Allreduce SUM is exactly the gradient of the global mean loss. Every rank runs the same number of
steps by construction. Rank 0 writes the checkpoint at the end of every epoch and of training.
"""
import os
import resource
import textwrap
import time
from pathlib import Path

import numpy as np

from . import checkpoint, data
from .checkpoint import CHECKPOINT_NAME, Checkpoint
from .comm import library_version
from .engine import loss_sums_raw, make_engine
from .errors import RunError, UsageError
from .faults import FaultInjector
from .kernels import ACTIVATIONS
from .log import Log
from .model import Architecture, init_params
from .schedule import Grid
from .signals import NoStopRequest, StopRequest
from .threads import limit_threads, oversubscription
from .timeline import Timeline
from .watchdog import NullWatchdog, Watchdog

BUNDLED = Path(__file__).resolve().parent.parent / "data"
EVAL_ROWS = 1024  # rows per forward pass when evaluating


def bundled(name):
    path = BUNDLED / name
    if not path.exists():
        raise UsageError(f"no --data given and the bundled data set {path} is missing "
                         "(run from a clone of mpinn, or pass --data)")
    return str(path)


def data_paths(cfg):
    if cfg.data:
        return cfg.data, cfg.val_data or None
    return bundled("digits-train.h5"), cfg.val_data or bundled("digits-test.h5")


def _start_checkpoint(cfg):
    """The checkpoint a run starts from (rank 0 only), or None."""
    if cfg.resume:
        path = os.path.join(cfg.run_dir, CHECKPOINT_NAME)
        if not os.path.exists(path):
            raise UsageError(f"--resume: no checkpoint at {path}")
        return checkpoint.load(path)
    return checkpoint.load(cfg.init) if cfg.init else None


def broadcast_checkpoint(comm, load):
    """Rank 0 runs load() (under comm.checked), then every rank gets the same Checkpoint or None."""
    ckpt = comm.checked(load) if comm.is_root else comm.checked(lambda: None)
    meta = comm.bcast_json(ckpt.meta() if ckpt is not None else None)
    if meta is None:
        return None
    if not comm.is_root:
        ckpt = Checkpoint.from_meta(meta)
    comm.bcast_(ckpt.params)
    for s in ckpt.optimizer_state:
        comm.bcast_(s)
    return ckpt


def _architecture(cfg, explicit, ckpt, n_features, n_outputs):
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
    if n_outputs is not None and arch.sizes[-1] != n_outputs and arch.loss == "mse":
        raise UsageError(f"the checkpoint's network has {arch.sizes[-1]} outputs; the data's "
                         f"targets have {n_outputs}")
    return arch


def check_labels(y, n_classes, path):
    if y is not None and y.size and y.max() >= n_classes:
        raise UsageError(f"{path}: class label {int(y.max())} is out of range for a network with "
                         f"{n_classes} classes")


def load_split(comm, path, cols, selections_of, min_rows=1, want_x=True, want_y=True,
               who="ranks"):
    """Each rank inspects the file and reads only its own rows (and only the inputs or targets it
    needs). Returns (n_rows, F, K|None, x|None, y|None)."""
    def read():
        with data.open_h5(path) as f:
            n, n_features, n_targets = data.inspect(f, path, cols)
        if n < min_rows:
            raise UsageError(f"{path} has {n} rows, fewer than the {min_rows} {who}")
        x, y = data.read_rows(path, cols, selections_of(n), n_targets, want_x, want_y)
        return n, n_features, n_targets, x, y
    return comm.checked(read)


class Evaluator:
    """Loss and accuracy on this reader's block of a data set, summed over all ranks (ranks that
    hold no targets, such as early pipeline stages, add zeros)."""

    def __init__(self, comm, n_local, x, y, arch):
        self.comm, self.n_local, self.x, self.y, self.arch = comm, n_local, x, y, arch

    def __call__(self, engine):
        sums = np.zeros(3)
        out_act = ACTIVATIONS[self.arch.output_activation]

        def consume(off, out):
            l, c = loss_sums_raw(out, self.y[off:off + len(out)], self.arch.loss, out_act)
            sums[:] += (l, c, len(out))
        engine.forward_chunks(self.n_local, lambda off, m: self.x[off:off + m], consume)
        loss, correct, n = self.comm.allreduce_sum(sums)
        return summarize(loss, correct, n, self.arch.loss, self.arch.sizes[-1])


def summarize(loss_sum, correct, n, loss, k):
    """Mean loss as PyTorch defines it, accuracy for classification (None for mse)."""
    n = max(n, 1)
    if loss == "cross_entropy":
        return loss_sum / n, correct / n
    return loss_sum / (n * k), None


def run(cfg, explicit, comm):
    rank, size = comm.rank, comm.size
    log = Log(rank, size)
    limit_threads(cfg.threads)
    warning = oversubscription(comm.node_size(), cfg.threads)
    if warning and comm.is_root:
        log.warn(warning)
    faults = FaultInjector.from_env(rank)
    grid = comm.checked(Grid, cfg.pipeline_stages, size, rank)
    readers, reader = grid.replicas, grid.replica
    train_path, val_path = comm.checked(data_paths, cfg)
    comm.checked(lambda: _prepare_run_dir(cfg.run_dir) if comm.is_root else None)
    ckpt = broadcast_checkpoint(comm, lambda: _start_checkpoint(cfg))

    loss = ckpt.arch.loss if ckpt else cfg.loss
    cols = data.Columns(cfg.x_key, cfg.y_key, loss)
    who = "ranks" if grid.stages == 1 else "pipeline replicas"
    if cfg.shuffle == "global" and grid.stages > 1:
        comm.checked(_raise, "--shuffle global works in data-parallel mode only for now; use "
                             "--shuffle rank or none with --pipeline-stages")
    if cfg.batch_size < readers:
        comm.checked(_raise, f"--batch-size {cfg.batch_size} is smaller than the number of {who} "
                             f"({readers}); each needs at least one row of each full batch")
    def train_selections(n):
        faults.at("load")
        return data.plan_selections(data.BatchPlan(n, cfg.batch_size, reader, readers))
    t_load = time.perf_counter()
    n_rows, n_features, n_targets, x, y = load_split(
        comm, train_path, cols, train_selections, readers, grid.is_first, grid.is_last, who)
    t_load = time.perf_counter() - t_load
    shard_bytes = sum(a.nbytes for a in (x, y) if a is not None)
    if loss == "cross_entropy":
        n_outputs = ckpt.arch.sizes[-1] if ckpt else int(
            comm.allreduce_minmax(int(y.max()) if y is not None and y.size else 0)[1]) + 1
    else:
        n_outputs = n_targets
    arch = comm.checked(_architecture, cfg, explicit, ckpt, n_features, n_outputs)
    if loss == "cross_entropy":
        comm.checked(check_labels, y, n_outputs, train_path)
    evaluate = None
    if val_path:
        n_val, val_features, _, vx, vy = load_split(
            comm, val_path, cols, lambda n: data.block_selections(n, reader, readers), 1,
            grid.is_first, grid.is_last)
        if val_features != n_features:
            comm.checked(_raise, f"{val_path} has {val_features} features; {train_path} has "
                                 f"{n_features}")
        if loss == "cross_entropy":
            comm.checked(check_labels, vy, n_outputs, val_path)
        evaluate = Evaluator(comm, data.even_part(n_val, readers, reader)[1], vx, vy, arch)

    plan = data.BatchPlan(n_rows, cfg.batch_size, reader, readers)
    counts = plan.local_counts()
    params = ckpt.params if ckpt else init_params(arch, cfg.seed)
    comm.bcast_(params)  # one source of truth for the initial weights: rank 0's
    opt_settings = dict(name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                        nesterov=cfg.nesterov, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    step = 0
    opt_state = None
    if cfg.resume:
        comm.checked(_check_resumable, cfg, ckpt)
        step = ckpt.global_step
        opt_state = (ckpt.optimizer_step, ckpt.optimizer_state)
        if ckpt.config.get("ranks") != size and cfg.shuffle == "rank":
            log.info(f"note: resuming on {size} ranks a run checkpointed on "
                     f"{ckpt.config.get('ranks')}: shuffled data order differs from an "
                     "uninterrupted run")
    engine = comm.checked(make_engine, comm, grid, arch, params, int(counts.max()), opt_settings,
                          opt_state, cfg.partition, cfg.micro_batches, cfg.schedule,
                          EVAL_ROWS if evaluate else 0, cfg.overlap_mb)
    del params, opt_state, ckpt  # the engine holds what this rank needs (a stage: its slice only)
    t0 = time.perf_counter()
    comm.first_on_each_node_then_rest(lambda: engine.warmup(x, y))
    jit_seconds = time.perf_counter() - t0
    if cfg.timeline:
        comm.checked(_check_output_path, cfg.timeline, "--timeline")
        engine.timeline = Timeline()
    timeline = engine.timeline

    spe = plan.steps_per_epoch
    max_steps = cfg.epochs * spe if cfg.steps == 0 else min(cfg.steps, cfg.epochs * spe)
    run_config = {**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "data": train_path,
                  "val_data": val_path or "", "ranks": size}
    log.info("mpinn train: config " + textwrap.fill(
        " ".join(f"{k}={v!r}" for k, v in run_config.items()), 100, subsequent_indent="  "))
    mode = (f"{grid.stages} pipeline stages (layers {engine.layers_per_stage}) x {readers} "
            f"replica(s), {cfg.micro_batches} micro-batches, {cfg.schedule}"
            if grid.stages > 1 else "data parallel")
    log.info(f"mpinn train: {size} rank(s) [{library_version()}], {mode}, network "
             f"{arch.describe()} ({arch.n_params:,} parameters, {arch.loss}), {n_rows} rows, "
             f"global batch {cfg.batch_size} -> {spe} steps/epoch; kernels ready in "
             f"{jit_seconds:.2f} s")
    log.open_metrics(os.path.join(cfg.run_dir, "metrics.jsonl"), append=cfg.resume)

    ckpt_path = os.path.join(cfg.run_dir, CHECKPOINT_NAME)
    last_saved = [step if cfg.resume else None]

    def save(epoch):
        t0 = time.perf_counter()
        params, state = engine.full_state()
        comm.checked(lambda: checkpoint.save(
            ckpt_path, Checkpoint(arch, params, engine.optimizer.name, engine.optimizer.t, state,
                                  epoch, step, cfg.seed, run_config),
            keep=cfg.keep_checkpoints, before_rename=lambda: faults.at("checkpoint", step))
            if comm.is_root else None)
        last_saved[0] = step
        timeline.add("checkpoint", t0, time.perf_counter())

    def diverged(step, epoch):
        kept = (f"the last good checkpoint {ckpt_path} (step {last_saved[0]}) is kept"
                if last_saved[0] is not None else "no checkpoint was written before it")
        comm.checked(_raise_run, f"non-finite loss or gradient at step {step} (epoch {epoch}): "
                                 f"the update was not applied and training stopped; {kept}. Lower "
                                 "--lr, or use --on-nonfinite skip to drop such steps", 3)

    stop = StopRequest(cfg.signal_grace, rank) if cfg.checkpoint_on_signal else NoStopRequest()
    watchdog = (Watchdog(comm, cfg.stall_warning, cfg.stall_timeout, log)
                if cfg.stall_warning or cfg.stall_timeout else NullWatchdog())
    engine.watchdog = watchdog

    try:
        comm.barrier()  # a shared clock origin for the timeline and the first window
        if timeline.enabled:
            timeline.start()

        startup_s = seconds_since_process_start()
        window = np.zeros(3)  # loss sum, correct, rows since the last log line (this rank)
        t_window = time.perf_counter()
        trained_samples, train_seconds = 0, 0.0  # global, training steps only
        saved_at = -1
        skipped = 0
        shuffle_seconds = 0.0
        stopping = False
        while step < max_steps and not stopping:
            epoch, first = divmod(step, spe)
            if cfg.shuffle == "global":
                t0 = time.perf_counter()
                ex, ey = data.global_shuffle(comm, x, y, n_rows, cfg.batch_size, cfg.seed, epoch)
                shuffle_seconds += time.perf_counter() - t0
                batches = data.EpochBatches(ex, ey, counts, False, cfg.seed, epoch, reader)
            else:
                batches = data.EpochBatches(x, y, counts, cfg.shuffle == "rank", cfg.seed, epoch,
                                            reader)
            for k in range(first, spe):
                if step >= max_steps:
                    break
                watchdog.begin(step + 1)
                faults.at("step", step + 1, engine)
                t0 = time.perf_counter()
                xb, yb = batches(k)
                xb = faults.batch(step + 1, xb)
                timeline.add("data", t0, time.perf_counter())
                per_row = 1 if loss == "cross_entropy" else n_outputs  # mse: mean over elements
                scale = 1.0 / plan.global_batch_rows(k) / per_row
                res = engine.step(xb, yb, int(counts[k]), scale, stop.requested)
                watchdog.end()
                step += 1
                if res.finite:
                    window += (res.loss, res.correct, res.rows)
                elif cfg.on_nonfinite == "stop":
                    diverged(step, epoch + 1)
                else:
                    skipped += 1
                    log.info(f"warning: step {step}: non-finite loss or gradient, update skipped "
                             f"({skipped} so far)")
                if step % cfg.log_every == 0 or step == max_steps or k == spe - 1:
                    total = comm.allreduce_sum(window)
                    now = time.perf_counter()
                    mean_loss, acc = summarize(*total, loss, n_outputs)
                    rate = total[2] / max(now - t_window, 1e-9)
                    trained_samples += int(total[2])
                    train_seconds += now - t_window
                    log.info(f"epoch {epoch + 1}/{cfg.epochs} step {step} loss {mean_loss:.4f}"
                             + (f" acc {acc:.4f}" if acc is not None else "")
                             + f" samples/s {rate:,.0f}")
                    log.metrics({"kind": "train", "epoch": epoch + 1, "step": step,
                                 "loss": mean_loss, "accuracy": acc, "samples": int(total[2]),
                                 "samples_per_s": rate})
                    window[:] = 0
                    t_window = now
                if step % cfg.check_every == 0 and not engine.replicas_agree():
                    raise RuntimeError(f"ranks hold different parameters after step {step}")
                if res.stop:  # every rank sees the same flag after the same step
                    stopping = True
                    break
            if step % spe == 0 and not stopping:  # a whole epoch is done
                record = {"kind": "epoch", "epoch": epoch + 1, "step": step}
                if evaluate:
                    t0 = time.perf_counter()
                    faults.at("evaluate", step)
                    record["val_loss"], record["val_accuracy"] = evaluate(engine)
                    timeline.add("evaluate", t0, time.perf_counter())
                    log.info(f"epoch {epoch + 1}/{cfg.epochs} validation loss "
                             f"{record['val_loss']:.4f}"
                             + (f" accuracy {record['val_accuracy']:.4f}"
                                if record["val_accuracy"] is not None else ""))
                log.metrics(record)
                save(epoch + 1)
                saved_at = step
                t_window = time.perf_counter()  # samples/s measures training, not evaluation or I/O
        if saved_at != step:
            save(step // spe)
        if stopping:
            what = stop.name if stop.requested else "a signal on another rank"
            comm.checked(_raise_run, f"stopped by {what} after step {step}: final checkpoint "
                                     f"{ckpt_path} written; continue with --resume",
                         stop.exit_code() if stop.requested else 143)
    finally:  # also when training ends with an error: handlers back, thread gone
        stop.restore()
        watchdog.stop()
    if not engine.replicas_agree():
        raise RuntimeError("ranks hold different parameters at the end of training")
    rate = trained_samples / max(train_seconds, 1e-9)
    per_rank = np.zeros((size, 3))  # peak RSS MB, shard MB, shard read seconds
    per_rank[rank] = (peak_rss_mb(), shard_bytes / 2**20, t_load)
    comm.allreduce_(per_rank)
    summary = {"kind": "summary", "step": step, "samples": trained_samples,
               "train_seconds": train_seconds, "samples_per_s": rate, "skipped_steps": skipped,
               "kernels_s": jit_seconds, "startup_s": startup_s,
               "global_shuffle_s": shuffle_seconds,
               "peak_rss_mb": per_rank[:, 0].tolist(), "shard_mb": per_rank[:, 1].tolist(),
               "shard_read_s": per_rank[:, 2].tolist()}
    if grid.stages > 1:
        summary["stages"] = gather_stage_stats(comm, grid, engine.stats())
        summary["ideal_bubble"] = (grid.stages - 1) / (cfg.micro_batches + grid.stages - 1)
        for s in summary["stages"]:
            log.info(f"stage {s['stage']}: {s['layers']} layer(s), compute {s['compute_s']:.3f} s, "
                     f"waiting {s['wait_s']:.3f} s, bubble {s['bubble']:.3f} (ideal "
                     f"{summary['ideal_bubble']:.3f}), activations {s['activation_bytes']:,} bytes")
    log.metrics(summary)
    if timeline.enabled:
        timeline.write(comm, cfg.timeline)
        log.info(f"mpinn train: timeline of {size} rank(s) written to {cfg.timeline} (open it in "
                 "ui.perfetto.dev or chrome://tracing)")
    log.info(f"mpinn train: ready {startup_s:.2f} s after start (kernels {jit_seconds:.2f} s); "
             f"peak RSS per rank {per_rank[:, 0].max():,.0f} MB max, data shard "
             f"{per_rank[:, 1].max():,.1f} MB max, read in {per_rank[:, 2].max():.2f} s")
    log.info(f"mpinn train: done, {step} steps, {trained_samples:,} samples in {train_seconds:.2f} s "
             f"of training steps ({rate:,.0f} samples/s); checkpoint "
             f"{os.path.join(cfg.run_dir, CHECKPOINT_NAME)}")
    log.close()
    return engine


STAT_KEYS = ("compute_s", "wait_s", "bubble", "activation_bytes", "layers")


def gather_stage_stats(comm, grid, stats):
    """Per-stage figures averaged over replicas (one small Allreduce over a stages x keys table)."""
    table = np.zeros((grid.stages, len(STAT_KEYS)))
    table[grid.stage] = [stats[k] for k in STAT_KEYS]
    table = comm.allreduce_sum_(table) / grid.replicas
    return [{"stage": s, **{k: (int(v) if k in ("activation_bytes", "layers") else float(v))
                            for k, v in zip(STAT_KEYS, table[s])}} for s in range(grid.stages)]


def peak_rss_mb():
    """This process's peak resident memory so far, MiB: VmHWM on Linux (ru_maxrss would also count
    the parent's memory before exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seconds_since_process_start():
    """Wall seconds since this process started (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _raise(message):
    raise UsageError(message)


def _raise_run(message, exit_code):
    raise RunError(message, exit_code)


def _prepare_run_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--run-dir {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --run-dir {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"--run-dir {path} is not writable")


def _check_output_path(path, option):
    """Only rank 0 writes outputs, but every rank may check: the folder must exist."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: directory {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a directory")


def _check_resumable(cfg, ckpt):
    saved = ckpt.config
    for key in ("batch_size", "optimizer"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise UsageError(f"--resume needs the same --{key.replace('_', '-')} as the checkpoint "
                             f"({saved[key]!r}), got {getattr(cfg, key)!r}")
