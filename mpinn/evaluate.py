"""`mpinn evaluate` (loss and accuracy, rows split across ranks, sums reduced) and `mpinn predict`
(classes and probabilities, or regression outputs, in input order to HDF5 or CSV)."""
import json
import os

import h5py
import numpy as np

from . import data
from .errors import UsageError
from .log import Log
from .model import Network
from .threads import limit_threads
from .train import Evaluator, broadcast_checkpoint, bundled, load_split, _check_labels
from . import checkpoint


def run_evaluate(cfg, explicit, comm):
    log = Log(comm.rank, comm.size)
    limit_threads(cfg.threads)
    ckpt = broadcast_checkpoint(comm, lambda: checkpoint.load(cfg.checkpoint))
    arch = ckpt.arch
    path = cfg.data or comm.checked(bundled, "digits-test.h5")
    cols = data.Columns(cfg.x_key, cfg.y_key, arch.loss)
    n_rows, n_features, n_targets, x, y = load_split(
        comm, path, cols, lambda n: data.block_selections(n, comm.rank, comm.size))
    def check():
        if n_features != arch.sizes[0]:
            raise UsageError(f"{path} has {n_features} features; the checkpoint's network takes "
                             f"{arch.sizes[0]}")
        if arch.loss == "cross_entropy":
            _check_labels(y, arch.sizes[-1], path)
        elif n_targets != arch.sizes[-1]:
            raise UsageError(f"{path}:{cfg.y_key} has {n_targets} targets; the network has "
                             f"{arch.sizes[-1]} outputs")
    comm.checked(check)
    net = Network(arch, ckpt.params, min(cfg.batch_size, max(x.shape[0], 1)))
    evaluator = Evaluator(comm, x, y, arch.loss, arch.sizes[-1], cfg.batch_size)
    loss, accuracy = evaluator(net)
    result = {"loss": loss, "accuracy": accuracy, "samples": n_rows, "checkpoint": cfg.checkpoint,
              "data": path, "ranks": comm.size}
    if cfg.json:
        log.info(json.dumps(result))
    else:
        log.info(f"{path}: {n_rows} samples, loss {loss:.4f}"
                 + (f", accuracy {accuracy:.4f}" if accuracy is not None else ""))
    return result


def _open_output(path, n, k, classify):
    """A writer for n rows of predictions: HDF5 datasets or a CSV file with a header."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"--out {path}: directory {directory} does not exist")
    if path.lower().endswith(".csv"):
        fh = open(path, "w")
        cols = (["pred"] + [f"p{j}" for j in range(k)]) if classify else [f"y{j}" for j in range(k)]
        fh.write(",".join(cols) + "\n")

        def write(start, out):
            if classify:
                table = np.column_stack([out.argmax(1), out])
                np.savetxt(fh, table, fmt=["%d"] + ["%.6g"] * k, delimiter=",")
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
    """Predictions stream chunk by chunk on rank 0 (memory stays one chunk); other ranks idle."""
    log = Log(comm.rank, comm.size)
    limit_threads(cfg.threads)
    if comm.size > 1:
        log.info(f"note: predict runs on rank 0; the other {comm.size - 1} rank(s) wait")
    ckpt = broadcast_checkpoint(comm, lambda: checkpoint.load(cfg.checkpoint))
    comm.checked(lambda: _predict(cfg, ckpt, log) if comm.is_root else None)


def _predict(cfg, ckpt, log):
    arch = ckpt.arch
    path = cfg.data or bundled("digits-test.h5")
    with data.open_h5(path) as f:
        n, n_features, _ = data.inspect(f, path, data.Columns(cfg.x_key), need_y=False)
    if n_features != arch.sizes[0]:
        raise UsageError(f"{path} has {n_features} features; the checkpoint's network takes "
                         f"{arch.sizes[0]}")
    classify = arch.loss == "cross_entropy"
    write, close = _open_output(cfg.out, n, arch.sizes[-1], classify)
    try:
        net = Network(arch, ckpt.params, min(cfg.batch_size, n))
        with data.open_h5(path) as f:
            for s in range(0, n, cfg.batch_size):
                rows = min(cfg.batch_size, n - s)
                x = data.read_inputs(f, path, cfg.x_key, [(slice(s, s + rows), rows)])
                write(s, net.forward(x))
    finally:
        close()
    log.info(f"wrote {n} predictions to {cfg.out}")
