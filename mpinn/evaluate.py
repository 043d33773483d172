"""`mpinn evaluate` (loss and accuracy, rows split across data-parallel readers, sums reduced) and
`mpinn predict` (classes and probabilities, or regression outputs, in input order to HDF5 or CSV).
Both run data parallel or, with --pipeline-stages, as a forward-only pipeline."""
import contextlib
import csv
import json
import os
import time
from dataclasses import replace

import h5py
import numpy as np

from . import checkpoint, data, metrics
from .config import ParallelOptions
from .errors import UsageError
from .log import Log
from .outputs import check_output_path, h5_written_whole, temporary_path, text_written_whole
from .plan import Grid, even_part
from .runtime.signals import Terminated, signals_held
from .runtime.threads import limit_threads
from .session import (Evaluator, broadcast_checkpoint, bundled, check_labels, check_metrics,
                      load_split, make_engine, own_weights)


def run_evaluate(cfg, explicit, comm):
    log = Log(comm.rank, comm.size)
    limit_threads(cfg.threads)
    grid = comm.checked(Grid, cfg.pipeline_stages, comm.size, comm.rank)
    ckpt = broadcast_checkpoint(comm, lambda: checkpoint.load(cfg.checkpoint))
    arch = ckpt.arch
    path, cols, part = comm.checked(evaluation_set, cfg, ckpt.config, arch)
    n_rows, n_features, n_targets, x, y = load_split(
        comm, path, cols, lambda n: data.block_selections(n, grid.replica, grid.replicas), 1,
        grid.is_first, grid.is_last)

    def check():
        if n_features != arch.sizes[0]:
            raise UsageError(f"{path} has {n_features} features; the checkpoint's network takes "
                             f"{arch.sizes[0]}")
        if arch.loss_fn.integer_labels:
            check_labels(y, arch.sizes[-1], path)
        elif n_targets != arch.sizes[-1]:
            raise UsageError(f"{path}:{cfg.y_key} has {n_targets} targets; the network has "
                             f"{arch.sizes[-1]} outputs")
    comm.checked(check)
    names = comm.checked(metrics.parse_names, cfg.metrics)
    check_metrics(comm, names, arch, y, path)
    ckpt.scaling.inputs_(x)  # what the network was trained on (none unless it was scaled)
    ckpt.scaling.targets_(y)
    n_local = even_part(n_rows, grid.replicas, grid.replica)[1]
    engine = comm.checked(make_engine, comm, grid, arch, ckpt.params,
                          min(cfg.batch_size, max(n_local, 1)),
                          parallel=ParallelOptions(partition=cfg.partition))
    if n_local:
        comm.in_cache_order(lambda: engine.warmup(x, y))
    else:
        comm.in_cache_order(lambda: None)
    w = own_weights(comm, path, cols, data.block_selections(n_rows, grid.replica, grid.replicas),
                    grid.is_last, optional=True)  # the run's --weight-key, where this file has it
    loss, accuracy, task = Evaluator(comm, n_local, x, y, arch, names, ckpt.scaling, w)(engine)
    result = {"loss": loss, "accuracy": accuracy, "samples": n_rows, "checkpoint": cfg.checkpoint,
              "data": path, "ranks": comm.size, "pipeline_stages": grid.stages,
              **({"part": "validation"} if part else {}), **task}
    if cfg.json:
        log.info(json.dumps(result))
    else:
        scaled = ", of the scaled targets" if ckpt.scaling.targets is not None else ""
        log.info(f"{path}{part}: {n_rows} samples, loss {loss:.4f} ({LOSS_MEANS[arch.loss]}"
                 f"{scaled})"
                 + (f", accuracy {accuracy:.4f}" if accuracy is not None else "")
                 + "".join(f", {name} {metrics.headline(name, v):.4f}" for name, v in task.items()
                           if metrics.headline(name, v) is not None and name != "accuracy"))
        if "confusion_matrix" in task:
            log.info("confusion matrix (rows: true class, columns: predicted):")
            for row in task["confusion_matrix"]:
                log.info("  " + " ".join(f"{v:>6}" for v in row))
    return result


LOSS_MEANS = {"cross_entropy": "mean cross-entropy", "bce": "mean binary cross-entropy",
              "mse": "mean squared error"}  # what `loss` is, said where a person reads it


def evaluation_set(cfg, config, arch):
    """(path, Columns, note) of what to evaluate: --data, or the bundled digits test set; but the
    validation rows of the training file (the same rows, data/split.py) when the checkpoint's run
    split them off with --val-fraction and --data is that file or not given."""
    cols = data.Columns(cfg.x_key, cfg.y_key, arch.loss, w_key=config.get("weight_key", ""),
                        dtype=arch.dtype)
    path = data.canonical_spec(cfg.data) if cfg.data else None
    fraction, trained_on = float(config.get("val_fraction") or 0), config.get("data")
    if not fraction or path not in (None, trained_on):
        return path or bundled("digits-test.h5"), cols, ""
    cols = replace(cols, x_key=config.get("x_key", cols.x_key),  # the run's own file and keys
                   y_key=config.get("y_key", cols.y_key))
    with data.open_h5(trained_on, cols) as f:
        n_rows = data.inspect(f, trained_on, cols, need_y=False)[0]
    _, val_rows = data.split_rows(n_rows, fraction, int(config.get("seed", 0)))
    return trained_on, replace(cols, rows=val_rows), (
        f" (its validation part: --val-fraction {fraction:g}, seed {config.get('seed', 0)})")


class PredictionFile:
    """Predictions for n rows written under a temporary name beside `path` (HDF5 datasets pred
    and prob, or output; or CSV by the suffix) and renamed to `path` only when all are written
    and flushed (outputs.written_whole: a full disk is one error naming the path, nothing is
    installed)."""

    def __init__(self, path, n, k, classify, class_names=None, labels=False, dtype=np.float32):
        """classify: one class of K (pred, prob); labels: K independent 0/1 labels (bce: pred
        and prob per label); neither: regression outputs. dtype: the network's (the outputs')."""
        self.path, self.k, self.classify, self.labels = path, k, classify, labels
        self.dtype = dtype
        self.names = np.array(class_names, dtype=object) if class_names else None
        self.files = contextlib.ExitStack()
        try:
            self._open(n)
        except BaseException:
            self.files.close()
            raise

    def _open(self, n):
        k = self.k
        if self.path.lower().endswith(".csv"):
            self.fh = self.files.enter_context(text_written_whole(self.path, newline=""))
            self.csv = csv.writer(self.fh)
            label = ["label"] if self.names is not None else []
            self.csv.writerow((["pred"] + label + [f"p{j}" for j in range(k)]) if self.classify
                              else [f"pred{j}" for j in range(k)] + [f"p{j}" for j in range(k)]
                              if self.labels else [f"y{j}" for j in range(k)])
            return
        self.fh = self.files.enter_context(h5_written_whole(self.path))
        with signals_held():
            self._create_datasets(n, k)

    def _create_datasets(self, n, k):
        if self.classify:
            pred = self.fh.create_dataset("pred", (n,), np.int64)
            self.fh.create_dataset("prob", (n, k), self.dtype)
            if self.names is not None:  # the class names the network was trained with
                pred.attrs["classes"] = self.names.astype(h5py.string_dtype())
                self.fh.create_dataset("label", (n,), h5py.string_dtype())
        elif self.labels:
            self.fh.create_dataset("pred", (n, k), np.int8)
            self.fh.create_dataset("prob", (n, k), self.dtype)
        else:
            self.fh.create_dataset("output", (n, k), self.dtype)

    def write(self, start, out):
        rows = slice(start, start + len(out))
        pred = out.argmax(1) if self.classify else (out > 0.5).astype(np.int8) if self.labels \
            else None
        if isinstance(self.fh, h5py.File):
            with signals_held():
                self._write_h5(rows, pred, out)
        elif self.classify:
            label = [[n] for n in self.names[pred]] if self.names is not None else [[]] * len(out)
            self.csv.writerows([p] + lab + [f"{v:.6g}" for v in o]
                               for p, lab, o in zip(pred.tolist(), label, out))
        elif self.labels:
            self.csv.writerows(p.tolist() + [f"{v:.6g}" for v in o] for p, o in zip(pred, out))
        else:
            self.csv.writerows([f"{v:.6g}" for v in o] for o in out)

    def _write_h5(self, rows, pred, out):
        if self.classify or self.labels:
            self.fh["pred"][rows] = pred
            self.fh["prob"][rows] = out
            if self.names is not None and self.classify:
                self.fh["label"][rows] = self.names[pred].astype(h5py.string_dtype())
        else:
            self.fh["output"][rows] = out

    def close(self, keep):
        """Close; rename into place when keep (everything written), else remove the temporary."""
        if keep:
            self.files.close()
        else:
            self.files.__exit__(NotWritten, NotWritten(), None)


class NotWritten(Exception):
    """Closes a PredictionFile's temporary without installing it (prediction failed)."""


WRITER_GRACE_S = 10.0


def outlive_the_writer(out, pid, grace=WRITER_GRACE_S):
    """A rank that does not write, stopped by a signal: its exit makes the launcher (Hydra)
    kill the ranks still running, so it waits (at most `grace` seconds) until the writer has
    removed its temporary, which the signal made it do once its current call returned; a writer
    still stuck then (in a collective this rank left) will be killed, and its temporary is
    removed here."""
    tmp = temporary_path(out, pid)
    deadline = time.monotonic() + grace
    while os.path.exists(tmp) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def predict_into(engine, writer, arch, path, cols, n, reads, scaling):
    """Replica 0's pass: its first stage reads the rows (reads) and scales them as the network's
    training did, its last stage writes the outputs (regression targets in their own units)."""
    def consume(off, out):
        writer.write(off, scaling.outputs_(arch.loss_fn.outputs_(out)))

    def read(off, m):
        return scaling.inputs_(data.read_inputs(f, path, cols.x_key, [(slice(off, off + m), m)],
                                                cols.dtype))
    f = data.open_h5(path, cols) if reads else None
    try:
        engine.forward_chunks(n, read, consume)
    finally:
        if f is not None:
            f.close()


def predict_on_every_rank(comm, engine, writer, arch, path, cols, n, chunk, scaling):
    """Data parallel: in round r, rank k predicts file rows [(r * size + k) * chunk, + chunk);
    the round's outputs are gathered to rank 0 in rank order, which is row order, and rank 0
    writes them as one block. Every rank works; rank 0 writes one file in input order and holds a
    round's outputs (size x chunk rows) at most. Each round's reads and writes are agreed, so a
    bad row on any rank is one clear error, not a rank waiting in the gather."""
    k = arch.sizes[-1]
    span = comm.size * chunk
    mine = np.empty((chunk, k), arch.float)
    gathered = np.empty((span, k), arch.float) if comm.is_root else None

    def keep(off, out):
        mine[off:off + len(out)] = scaling.outputs_(arch.loss_fn.outputs_(out))

    def reader(f, first):
        return lambda off, m: scaling.inputs_(
            data.read_inputs(f, path, cols.x_key, [(slice(first + off, first + off + m), m)],
                             cols.dtype))
    with data.open_h5(path, cols) as f:
        for start in range(0, n, span):
            rows = [max(0, min(chunk, n - start - j * chunk)) for j in range(comm.size)]
            m = rows[comm.rank]
            comm.checked(engine.forward_chunks, m, reader(f, start + comm.rank * chunk), keep)
            block = gathered[:sum(rows)] if comm.is_root else None
            comm.gatherv_(mine[:m].reshape(-1), None if block is None else block.reshape(-1),
                          [r * k for r in rows])
            comm.checked(writer.write if writer else lambda *_: None, start, block)


def run_predict(cfg, explicit, comm):
    """Data parallel, every rank predicts its share of each round and rank 0 writes them in input
    order (predict_on_every_rank). With --pipeline-stages, replica 0 streams the rows chunk by
    chunk (its first stage reads, its last stage writes); other replicas only take part in
    set-up."""
    log = Log(comm.rank, comm.size)
    limit_threads(cfg.threads)
    grid = comm.checked(Grid, cfg.pipeline_stages, comm.size, comm.rank)
    if grid.stages > 1 and grid.replicas > 1:
        log.info(f"note: a pipelined predict runs on {grid.stages} rank(s); the other "
                 f"{comm.size - grid.stages} wait")
    ckpt = broadcast_checkpoint(comm, lambda: checkpoint.load(cfg.checkpoint))
    arch = ckpt.arch
    path = cfg.data or comm.checked(bundled, "digits-test.h5")
    active = grid.replica == 0
    classify = arch.loss_fn.integer_labels
    # a table's inputs leave out the columns the run trained on as labels and weights
    cols = data.Columns(cfg.x_key, ckpt.config.get("y_key", "y"),
                        w_key=ckpt.config.get("weight_key", ""), dtype=arch.dtype)

    def prepare():
        with data.open_h5(path, cols) as f:
            n, n_features, _ = data.inspect(f, path, cols, need_y=False)
        if n_features != arch.sizes[0]:
            raise UsageError(f"{path} has {n_features} features; the checkpoint's network takes "
                             f"{arch.sizes[0]}")
        check_output_path(cfg.out, overwrite=cfg.overwrite)
        return n
    n = comm.checked(prepare)
    names = ckpt.config.get("class_names")
    writes = comm.is_root if grid.stages == 1 else active and grid.is_last
    writer = comm.checked(lambda: PredictionFile(cfg.out, n, arch.sizes[-1], classify, names,
                                                 arch.loss == "bce", arch.float)
                          if writes else None)
    writer_pid = int(comm.allgather_ints([os.getpid() if writes else 0]).max())
    try:
        chunk = min(cfg.batch_size, n)
        engine = comm.checked(make_engine, comm, grid, arch, ckpt.params, chunk,
                              parallel=ParallelOptions(partition=cfg.partition))
        if grid.stages == 1:
            predict_on_every_rank(comm, engine, writer, arch, path, cols, n, chunk,
                                  ckpt.scaling)
        elif active:
            predict_into(engine, writer, arch, path, cols, n, grid.is_first, ckpt.scaling)
    except BaseException as e:  # a failure or a signal anywhere: the temporary goes, nothing
        if writer:              # installed
            writer.close(keep=False)
        elif isinstance(e, Terminated):
            outlive_the_writer(cfg.out, writer_pid)
        raise
    # a full disk shows when the file is flushed: every rank hears it, rank 0 reports only after
    comm.checked(lambda: writer.close(keep=True) if writer else None)
    log.info(f"wrote {n} predictions to {cfg.out}")
