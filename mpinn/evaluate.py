"""`mpinn evaluate` (loss and accuracy, rows split across data-parallel readers, sums reduced) and
`mpinn predict` (classes and probabilities, or regression outputs, in input order to HDF5 or CSV).
Both run data parallel or, with --pipeline-stages, as a forward-only pipeline."""
import json

import h5py
import numpy as np

from . import checkpoint, data
from .errors import UsageError
from .log import Log
from .outputs import check_output_path
from .plan import Grid, even_part
from .runtime.threads import limit_threads
from .session import (Evaluator, broadcast_checkpoint, bundled, check_labels, load_split,
                      make_engine)


def run_evaluate(cfg, explicit, comm):
    log = Log(comm.rank, comm.size)
    limit_threads(cfg.threads)
    grid = comm.checked(Grid, cfg.pipeline_stages, comm.size, comm.rank)
    ckpt = broadcast_checkpoint(comm, lambda: checkpoint.load(cfg.checkpoint))
    arch = ckpt.arch
    path = cfg.data or comm.checked(bundled, "digits-test.h5")
    cols = data.Columns(cfg.x_key, cfg.y_key, arch.loss)
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
    n_local = even_part(n_rows, grid.replicas, grid.replica)[1]
    engine = comm.checked(make_engine, comm, grid, arch, ckpt.params,
                          min(cfg.batch_size, max(n_local, 1)), partition=cfg.partition)
    if n_local:
        comm.first_on_each_node_then_rest(lambda: engine.warmup(x, y))
    else:
        comm.first_on_each_node_then_rest(lambda: None)
    loss, accuracy = Evaluator(comm, n_local, x, y, arch)(engine)
    result = {"loss": loss, "accuracy": accuracy, "samples": n_rows, "checkpoint": cfg.checkpoint,
              "data": path, "ranks": comm.size, "pipeline_stages": grid.stages}
    if cfg.json:
        log.info(json.dumps(result))
    else:
        log.info(f"{path}: {n_rows} samples, loss {loss:.4f}"
                 + (f", accuracy {accuracy:.4f}" if accuracy is not None else ""))
    return result


def open_output(path, n, k, classify):
    """(write(offset, outputs), close) for n rows of predictions: HDF5 datasets or CSV."""
    check_output_path(path)
    if path.lower().endswith(".csv"):
        fh = open(path, "w")
        cols = (["pred"] + [f"p{j}" for j in range(k)]) if classify else [f"y{j}" for j in range(k)]
        fh.write(",".join(cols) + "\n")

        def write(start, out):
            if classify:
                np.savetxt(fh, np.column_stack([out.argmax(1), out]), fmt=["%d"] + ["%.6g"] * k,
                           delimiter=",")
            else:
                np.savetxt(fh, out, fmt="%.6g", delimiter=",")
        return write, fh.close
    f = h5py.File(path, "w")
    if classify:
        pred = f.create_dataset("pred", (n,), np.int64)
        prob = f.create_dataset("prob", (n, k), np.float32)
    else:
        output = f.create_dataset("output", (n, k), np.float32)

    def write(start, out):
        if classify:
            pred[start:start + len(out)] = out.argmax(1)
            prob[start:start + len(out)] = out
        else:
            output[start:start + len(out)] = out
    return write, f.close


def run_predict(cfg, explicit, comm):
    """Replica 0 streams the rows chunk by chunk (its first stage reads, its last stage writes),
    so memory stays one chunk; other ranks only take part in set-up."""
    log = Log(comm.rank, comm.size)
    limit_threads(cfg.threads)
    grid = comm.checked(Grid, cfg.pipeline_stages, comm.size, comm.rank)
    if grid.replicas > 1:
        log.info(f"note: predict runs on {grid.stages} rank(s); the other "
                 f"{comm.size - grid.stages} wait")
    ckpt = broadcast_checkpoint(comm, lambda: checkpoint.load(cfg.checkpoint))
    arch = ckpt.arch
    path = cfg.data or comm.checked(bundled, "digits-test.h5")
    active = grid.replica == 0
    classify = arch.loss_fn.integer_labels

    def prepare():
        with data.open_h5(path) as f:
            n, n_features, _ = data.inspect(f, path, data.Columns(cfg.x_key), need_y=False)
        if n_features != arch.sizes[0]:
            raise UsageError(f"{path} has {n_features} features; the checkpoint's network takes "
                             f"{arch.sizes[0]}")
        writer = open_output(cfg.out, n, arch.sizes[-1], classify) if active and grid.is_last \
            else None
        return n, writer
    n, writer = comm.checked(prepare)
    engine = comm.checked(make_engine, comm, grid, arch, ckpt.params, min(cfg.batch_size, n),
                          partition=cfg.partition)
    if active:
        write = writer[0] if writer else None

        def consume(off, out):
            write(off, arch.loss_fn.outputs_(out))
        f = data.open_h5(path) if grid.is_first else None
        try:
            engine.forward_chunks(
                n, lambda off, m: data.read_inputs(f, path, cfg.x_key, [(slice(off, off + m), m)]),
                consume)
        finally:
            if f is not None:
                f.close()
            if writer:
                writer[1]()
    comm.barrier()  # rank 0 reports only once the last stage has closed the file
    log.info(f"wrote {n} predictions to {cfg.out}")
