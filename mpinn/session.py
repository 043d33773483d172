"""What train, evaluate and predict share: the data files (the bundled digits by default), the
checkpoint every rank starts from (rank 0 loads it, every rank receives it), each rank's slice of a
data file with its checks, the engine for this rank, and evaluation summed over ranks.

Every phase that can fail on some ranks only runs under comm.checked(), so a bad file is one clear
error on every rank instead of a hang.
"""
import numpy as np

from . import assets, data, metrics
from .checkpoint import Checkpoint
from .config import ParallelOptions
from .data_parallel import DataParallelEngine
from .errors import UsageError, raise_usage
from .kernels import activation
from .pipeline import PipelineEngine


def bundled(name):
    """Path of a bundled data file (shipped inside the package)."""
    return assets.file_path("data", name)


def data_paths(train, val, split=False):
    """(training data, validation data or None) of --data and --val-data: the bundled digits when
    --data is not given (without their test set when the validation rows are split off)."""
    if train:
        return data.canonical_spec(train), (data.canonical_spec(val) if val else None)
    return bundled("digits-train.h5"), (data.canonical_spec(val) if val
                                        else None if split else bundled("digits-test.h5"))


def broadcast_checkpoint(comm, load):
    """Rank 0 runs load() (under comm.checked), then every rank gets the same Checkpoint or None."""
    ckpt = comm.on_root(load)
    meta = comm.bcast_json(ckpt.meta() if ckpt is not None else None)
    if meta is None:
        return None
    if not comm.is_root:
        ckpt = Checkpoint.from_meta(meta)
    comm.bcast_(ckpt.params)
    for s in ckpt.optimizer_state:
        comm.bcast_(s)
    return ckpt


def load_split(comm, path, cols, selections_of, min_rows=1, want_x=True, want_y=True,
               who="ranks"):
    """Each rank inspects the file and reads only its own rows (and only the inputs or targets it
    needs). Returns (n_rows, F, K|None, x|None, y|None)."""
    def read():
        with data.open_h5(path, cols) as f:
            n, n_features, n_targets = data.inspect(f, path, cols)
        if n < min_rows:
            raise UsageError(f"{path} has {n} rows, fewer than the {min_rows} {who}")
        x, y = data.read_rows(path, cols, selections_of(n), n_targets, want_x, want_y)
        return n, n_features, n_targets, x, y
    return comm.checked(read)


def own_weights(comm, path, cols, selections, reads, optional=False):
    """The rows' own weights (--weight-key) of these selections where this rank reads targets
    (reads), else None; none at all without the option, or (optional) when the file has no such
    dataset. Refused when they are all 0 over every rank's rows."""
    if not cols.w_key or (optional and not comm.checked(data.has_dataset, path, cols.w_key)):
        return None
    w = comm.checked(lambda: data.read_weights(path, cols, selections) if reads else None)
    total = comm.allreduce_sum([w.sum(dtype=np.float64) if w is not None else 0.0])[0]
    if not total > 0:
        comm.checked(raise_usage, f"{path}:{cols.w_key}: every row weight is 0")
    return w


def check_labels(y, n_classes, path, rows_of=None):
    """Every label of this rank's rows is a class of the network; rows_of() gives the file rows
    of the local ones, to name the offending row."""
    if y is not None and y.size and y.max() >= n_classes:
        at = int(np.argmax(y))
        row = int(rows_of()[at]) if rows_of else at
        raise UsageError(f"{path}: class label {int(y.max())} is out of range for a network with "
                         f"{n_classes} classes (row {row})")


def make_engine(comm, grid, arch, params, max_rows, *, optimizer=None, opt_state=None,
                eval_rows=0, parallel=None):
    """The engine for this rank: data parallel when the grid has one stage, else a pipeline.
    max_rows: the most rows of one step on this reader; optimizer: the Optimizer's settings (None
    for an engine that only runs forward) and opt_state a checkpoint's (step, buffers);
    eval_rows: rows per evaluation pass (data parallel; a pipeline evaluates in micro-batch sized
    chunks); parallel: how the work is split (the train options' section)."""
    p = parallel or ParallelOptions()
    if grid.stages == 1:
        return DataParallelEngine(comm, arch, params, max_rows, optimizer, opt_state, eval_rows,
                                  p.overlap_mb, p.accumulate, p.shard_optimizer, p.allreduce)
    return PipelineEngine(comm, grid, arch, params, max_rows, optimizer, opt_state, p.partition,
                          p.micro_batches, p.schedule, p.shard_optimizer)


def check_metrics(comm, names, arch, y, path):
    """The named metrics fit the network's loss and, for the ranking ones, every class occurs
    among the labels of `path` (y: this rank's; agreed by all ranks)."""
    binary = arch.sizes[-1] if arch.loss == "bce" else 0
    comm.checked(metrics.check_names, names, arch.loss_fn.integer_labels, binary)
    if names and (arch.loss_fn.integer_labels or binary):
        local = (np.unique(y if not binary else (y > 0.5).astype(np.int64)) if y is not None
                 else [])
        labels = comm.allgather_ints(local)
        comm.checked(metrics.check_classes, names, labels, max(arch.sizes[-1], 2), path)


class Evaluator:
    """Loss and accuracy on this reader's block of a data set, summed over all ranks (ranks that
    hold no targets, such as early pipeline stages, add zeros), and the task metrics named in
    `metrics` (metrics.py): every rank's outputs and labels gathered to rank 0, which computes them
    from all rows and tells every rank. `scaling`: what the targets were scaled by, so that
    regression metrics are in the targets' own units."""

    def __init__(self, comm, n_local, x, y, arch, metrics=(), scaling=None, w=None):
        self.comm, self.n_local, self.x, self.y, self.arch = comm, n_local, x, y, arch
        self.metrics, self.scaling, self.w = tuple(metrics), scaling, w  # w: the rows' own

    def __call__(self, engine):
        """-> (mean loss, accuracy or None, {metric: value})."""
        sums = np.zeros(4)  # loss sum, correct, rows, row weights (rows when unweighted)
        loss, out_act = self.arch.loss_fn, activation(self.arch.output_activation)
        k = self.arch.sizes[-1]
        kept = np.empty((self.n_local if self.metrics and self.y is not None else 0, k),
                        self.arch.float)

        def consume(off, out):
            rows = len(out)
            if len(kept):  # before the loss's gradient replaces the outputs
                kept[off:off + rows] = loss.outputs_(out.copy())
            y = self.y[off:off + rows]
            own = None if self.w is None else self.w[off:off + rows]
            weights = loss.row_weights(y)
            if own is not None:
                weights = own if weights is None else weights * own
            sums[:] += (*loss.grad_(out, y, out_act, 1.0, own), rows,
                        rows if weights is None else weights.sum(dtype=np.float64))
        engine.forward_chunks(self.n_local, lambda off, m: self.x[off:off + m], consume)
        loss_sum, correct, n, weight = self.comm.allreduce_sum(sums)
        mean_loss, accuracy = loss.summarize(loss_sum, correct, n, k, weight)
        return mean_loss, accuracy, self.task_metrics(kept) if self.metrics else {}

    def task_metrics(self, outputs):
        """The named metrics over every rank's rows (collective)."""
        integer = self.arch.loss_fn.integer_labels
        y = self.y[:len(outputs)] if len(outputs) else np.zeros((0,) + (() if integer else (
            outputs.shape[1],)), np.int64 if integer else self.arch.float)
        counts = self.comm.allgather_ints([len(outputs)])
        total = int(counts.sum())
        root = self.comm.is_root
        all_out = np.empty((total, outputs.shape[1]), self.arch.float) if root else None
        all_y = np.empty((total,) + y.shape[1:], y.dtype) if root else None
        width = outputs.shape[1]
        self.comm.gatherv_(np.ascontiguousarray(outputs).reshape(-1),
                           all_out.reshape(-1) if root else None, (counts * width).tolist())
        self.comm.gatherv_(np.ascontiguousarray(y).reshape(-1),
                           all_y.reshape(-1) if root else None,
                           (counts * (1 if integer else width)).tolist())

        def compute():
            if self.scaling is not None and not integer:  # in the targets' own units
                self.scaling.outputs_(all_out)
                self.scaling.outputs_(all_y)
            return metrics.compute(self.metrics, all_y, all_out, integer,
                                   self.arch.loss == "bce")
        return self.comm.bcast_json(self.comm.on_root(compute))
