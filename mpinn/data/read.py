"""Reading a rank's rows: the checks every reader runs (shapes, dtypes, labels, finite values),
the selections of the rows a rank owns (plan.BatchPlan says which: one strided block selection over
the full batches, h5py.MultiBlockSlice, read as one hyperslab, plus its part of the last, shorter
batch) and positioned reads of rows in any order for streaming."""
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from ..errors import UsageError
from ..kernels import all_finite  # one pass, no temporary the size of the shard
from ..losses import LOSSES
from ..plan import even_part
from .files import open_h5, plain_value
from .tables import spans


@dataclass(frozen=True)
class Columns:
    """Where and what the inputs and targets are in a data file. `rows`: the file rows (ascending)
    this set is made of, when it is a part of the file (data/split.py); row i of the set is file
    row rows[i], and every selection below counts in the set's rows."""
    x_key: str = "X"
    y_key: str = "y"
    loss: str = "cross_entropy"
    rows: np.ndarray = field(default=None, compare=False)
    w_key: str = ""  # a dataset of each row's own weight (--weight-key), or none
    dtype: str = "float32"  # what inputs, float targets and weights are read as: the network's

    def file_rows(self, rows):
        """The file rows of the set's rows."""
        return rows if self.rows is None else self.rows[rows]


def _dataset(f, key, path, what):
    if key not in f or not hasattr(f[key], "read_direct"):  # an HDF5 dataset, or tables.Rows
        raise UsageError(
            f"{path}: no dataset {key!r} for {what} (use --{'x' if what == 'inputs' else 'y'}-key"
            f" to name another; found: {', '.join(sorted(f.keys())) or 'nothing'})"
        )
    return f[key]


def inspect(f, path, cols, need_y=True):
    """Check shapes and dtypes without reading data. Returns (n_rows, n_features, n_targets or
    None); n_targets is the width of y for mse and None for class labels."""
    X = _dataset(f, cols.x_key, path, "inputs")
    if X.ndim != 2:
        raise UsageError(
            f"{path}:{cols.x_key} must be 2-D (rows x features); it has shape {X.shape}"
        )
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise UsageError(f"{path}:{cols.x_key} must be numeric; it has dtype {X.dtype}")
    n, n_features = X.shape
    if n == 0:
        raise UsageError(f"{path}:{cols.x_key} is empty (0 rows)")
    if cols.rows is not None:
        if len(cols.rows) and cols.rows[-1] >= n:
            raise UsageError(f"{path}:{cols.x_key} has {n} rows, fewer than the split's "
                             f"{int(cols.rows[-1]) + 1} (the file changed?)")
        n = len(cols.rows)
    if not need_y:
        return n, n_features, None
    y = _dataset(f, cols.y_key, path, "targets")
    if y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
        raise UsageError(f"{path}:{cols.y_key} must have one entry per row of {cols.x_key} "
                         f"({X.shape[0]}); it has shape {y.shape}")
    if not np.issubdtype(y.dtype, np.number):
        raise UsageError(f"{path}:{cols.y_key} must be numeric; it has dtype {y.dtype}")
    if LOSSES[cols.loss].integer_labels:
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise UsageError(f"{path}:{cols.y_key} must hold integer class labels (1-D) for "
                             f"--loss cross_entropy; it has shape {y.shape}, dtype {y.dtype}")
        return n, n_features, None
    return n, n_features, 1 if y.ndim == 1 else y.shape[1]


def stored_classes(path, y_key):
    """The number of classes stored with the labels (an attribute `classes` with their names, or
    `n_classes`, on the label dataset), or None."""
    with open_h5(path) as f:
        if y_key not in f:
            return None
        attrs = f[y_key].attrs
        if "classes" in attrs:
            return len(attrs["classes"])
        if "n_classes" in attrs:
            return int(attrs["n_classes"])
    return None


def class_names(spec, y_key):
    """The class names stored with the labels (the `classes` attribute a CSV conversion writes),
    as a list of str, or None."""
    with open_h5(spec) as f:
        if y_key in f and "classes" in f[y_key].attrs:
            return [str(plain_value(v)) for v in f[y_key].attrs["classes"]]
    return None


def _read_selection(ds, out, selections, file_rows=None):
    """Read (selection, rows) pieces of ds into consecutive rows of out, converting dtype. With
    `file_rows` (Columns.rows) the selections count in those rows, not the file's."""
    row = 0
    for sel, rows in selections:
        if rows and file_rows is None:
            ds.read_direct(out, source_sel=np.s_[sel], dest_sel=np.s_[row:row + rows])
        elif rows:
            read_rows_at(ds, file_rows[_indices(sel)], out[row:row + rows])
        row += rows
    return out


def _indices(sel):
    """The row numbers of a slice or an h5py.MultiBlockSlice, in order."""
    if isinstance(sel, slice):
        return np.arange(sel.start, sel.stop)
    starts = sel.start + sel.stride * np.arange(sel.count)
    return (starts[:, None] + np.arange(sel.block)).reshape(-1)


def read_rows_at(ds, file_rows, out):
    """out[i] = ds[file_rows[i]] for ascending file rows: each span (spans()) is one read (the
    rows between them read and dropped), a consecutive run straight into out."""
    parts = spans(file_rows)
    for part in parts:
        if not len(part):
            continue
        i, j = int(part[0]), int(part[-1]) + 1
        a, b = int(file_rows[i]), int(file_rows[j - 1]) + 1
        if b - a == j - i:
            ds.read_direct(out, source_sel=np.s_[a:b], dest_sel=np.s_[i:j])
        else:
            out[i:j] = ds[a:b][file_rows[i:j] - a]
    return out


def plan_selections(plan):
    """The file selections (with their row counts) that read exactly plan.owned_rows(), in order."""
    sel = []
    off, cnt = plan.full_part()
    if plan.n_full and cnt:
        sel.append(
            (
                h5py.MultiBlockSlice(start=off, stride=plan.batch, count=plan.n_full, block=cnt),
                plan.n_full * cnt,
            )
        )
    if plan.last_batch:
        off, cnt = plan.last_part()
        start = plan.n_full * plan.batch + off
        sel.append((slice(start, start + cnt), cnt))
    return sel


def block_selections(n_rows, rank, size):
    """The contiguous block of rows a rank owns for evaluation and prediction."""
    off, cnt = even_part(n_rows, size, rank)
    return [(slice(off, off + cnt), cnt)]


def _check_finite(path, ds, key, x, read_native):
    """x must be finite. When it is not and the file stores wider floats, read_native() gives
    the same rows as stored (only on this error path): all finite there means they overflow
    float32 (1e300 is finite in float64 and inf in float32), which is not "NaN or inf" and wants
    another fix."""
    if all_finite(x.reshape(-1)):
        return
    if ds.dtype.kind == "f" and ds.dtype.itemsize > x.dtype.itemsize:
        native = np.asarray(read_native())
        if np.isfinite(native).all():
            raise UsageError(f"{path}:{key} holds values beyond float32's range (largest "
                             f"|value| {float(np.abs(native).max()):.3g}, float32 ends at "
                             "3.4e+38); mpinn trains in float32: rescale the data, or train "
                             "with --dtype float64")
    raise UsageError(f"{path}:{key} contains NaN or inf values")


def read_rows(path, cols, selections, n_targets, want_x=True, want_y=True):
    """Read the rows named by `selections` (see plan_selections) as inputs and int64 labels or
    (rows, n_targets) targets, floats in cols.dtype. Only those rows are read; an input or target
    not wanted (a pipeline stage that does not need it) is returned as None and not read at
    all."""
    n = sum(rows for _, rows in selections)
    x = y = None
    with open_h5(path, cols) as f:
        m = cols.rows
        if want_x:
            X = f[cols.x_key]
            x = _read_selection(X, np.empty((n, X.shape[1]), cols.dtype), selections, m)
            _check_finite(path, X, cols.x_key, x, lambda: _read_selection(
                X, np.empty((n, X.shape[1]), X.dtype), selections, m))
        if not want_y:
            return x, y
        y_ds = f[cols.y_key]
        if n_targets is None:
            y = _read_selection(y_ds, np.empty(n, np.int64), selections, m)
            if n and y.min() < 0:
                raise UsageError(f"{path}:{cols.y_key} has negative class labels (min {y.min()})")
        else:
            shape = (n,) if y_ds.ndim == 1 else (n, n_targets)
            y = _read_selection(y_ds, np.empty(shape, cols.dtype), selections, m).reshape(
                n, n_targets)
            _check_finite(path, y_ds, cols.y_key, y, lambda: _read_selection(
                y_ds, np.empty(shape, y_ds.dtype), selections, m))
            if cols.loss == "bce" and n and (y.min() < 0 or y.max() > 1):
                raise UsageError(f"{path}:{cols.y_key} holds values outside [0, 1] (min "
                                 f"{y.min():g}, max {y.max():g}): --loss bce takes 0/1 targets "
                                 "(or probabilities)")
    return x, y


def has_dataset(path, key):
    with open_h5(path) as f:
        return hasattr(f.get(key), "read_direct")


def read_weights(path, cols, selections):
    """The own weights (--weight-key) of the selected rows in cols.dtype, checked: one finite,
    non-negative number per row of the inputs."""
    n = sum(rows for _, rows in selections)
    with open_h5(path, cols) as f:
        ds = f.get(cols.w_key)
        if not hasattr(ds, "read_direct"):
            raise UsageError(f"{path}: no dataset {cols.w_key!r} of row weights (--weight-key; "
                             f"found: {', '.join(sorted(f.keys()))})")
        rows = f[cols.x_key].shape[0]
        if ds.ndim != 1 or ds.shape[0] != rows or not np.issubdtype(ds.dtype, np.number):
            raise UsageError(f"{path}:{cols.w_key} must hold one number per row of "
                             f"{cols.x_key} ({rows}); it has shape {ds.shape}, dtype {ds.dtype}")
        w = _read_selection(ds, np.empty(n, np.float64), selections, cols.rows)
    if n and not np.isfinite(w).all():
        raise UsageError(f"{path}:{cols.w_key} contains NaN or inf weights")
    if n and w.min() < 0:
        raise UsageError(f"{path}:{cols.w_key} holds negative weights (min {w.min():g})")
    return w.astype(cols.dtype)  # what the kernels take


def read_inputs(f, path, x_key, selections, dtype=np.float32):
    """Only the inputs of the selected rows of the open file f (prediction), as dtype."""
    n = sum(rows for _, rows in selections)
    X = f[x_key]
    x = _read_selection(X, np.empty((n, X.shape[1]), dtype), selections)
    _check_finite(path, X, x_key, x, lambda: _read_selection(
        X, np.empty((n, X.shape[1]), X.dtype), selections))
    return x


def read_file_rows(X, rows, dtype=np.float32):
    """Inputs (as dtype) of the given file rows (unique, any order) from the open dataset X: runs
    of consecutive rows as slices, scattered rows as one sorted selection."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    out = np.empty((len(rows), X.shape[1]), dtype)
    got = np.empty_like(out)
    breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
    if len(breaks) < len(rows) // 8:  # mostly runs (file order, a rank's blocks of each batch)
        for run in np.split(np.arange(len(rows)), breaks):
            if len(run):
                a = int(ordered[run[0]])
                X.read_direct(got, source_sel=np.s_[a:a + len(run)],
                              dest_sel=np.s_[run[0]:run[0] + len(run)])
    elif len(rows):
        got[...] = X[ordered]
    out[order] = got
    return out


def pread_fully(fd, out, offset, name):
    """Fill the array `out` from the file at byte `offset`. One preadv returns at most about 2 GiB
    on Linux (and may return less at any size), so read on until every byte is in; end of file
    before that is an error naming the file."""
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise UsageError(f"{name}: short read (the file changed while training?)")
        done += got


class RowSource:
    """Reads rows (any order) of a file's 2-D input dataset for streaming. Uncompressed data
    stored contiguously or in chunks of whole rows is read with plain positioned reads (pread) of
    each run of consecutive rows, from the page cache when the file is there: faster than HDF5's
    selections for scattered rows (docs/performance.md), and nothing stays mapped or resident
    (memory maps were faster still, but the kernel maps the pages around every touched row, so a
    process soon holds its whole slice). Anything else (filters, a virtual dataset over many
    files) is read through HDF5 (read_file_rows)."""

    MAX_RANGES = 4096

    def __init__(self, path, x_key, file_rows=None, cols=None):
        self.f = open_h5(path, cols)
        self.X = self.f[x_key]
        self.file_rows = file_rows  # Columns.rows: the rows asked for count in these
        self.dtype = np.dtype(cols.dtype if cols is not None else np.float32)
        self.layout, self.fd = self._layout(), None
        if self.layout:
            self.fd = os.open(self.f.filename, os.O_RDONLY)

    def _layout(self):
        """(rows per stored range, the ranges' byte offsets) when the rows can be read directly."""
        X = self.X
        if not isinstance(X, h5py.Dataset) or (
                X.is_virtual or X.id.get_create_plist().get_nfilters() or X.ndim != 2
                or X.dtype.kind not in "fiu"):
            return None  # Parquet, NumPy, a filter, a virtual dataset: read through the reader
        if X.chunks is None:
            offset = X.id.get_offset()
            return None if offset is None else (X.shape[0], [offset])
        rows, width = X.chunks
        count = -(-X.shape[0] // rows)
        if width != X.shape[1] or count > self.MAX_RANGES:
            return None
        infos = [X.id.get_chunk_info_by_coord((i * rows, 0)) for i in range(count)]
        if any(info.byte_offset is None for info in infos):
            return None
        return rows, [info.byte_offset for info in infos]

    def file_rows_of(self, rows):
        return rows if self.file_rows is None else self.file_rows[rows]

    def read(self, rows):
        rows = self.file_rows_of(rows)
        if not self.layout or not len(rows):
            return read_file_rows(self.X, rows, self.dtype)
        per_range, offsets = self.layout
        row_bytes = self.X.shape[1] * self.X.dtype.itemsize
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        got = np.empty((len(rows), self.X.shape[1]), self.X.dtype)
        # a run: consecutive rows within one stored range, read with one pread
        starts = np.flatnonzero((np.diff(ordered, prepend=-2) != 1)
                                | (ordered % per_range == 0))
        for a, b in zip(starts.tolist(), np.append(starts[1:], len(rows)).tolist()):
            r, k = divmod(int(ordered[a]), per_range)
            pread_fully(self.fd, got[a:b], offsets[r] + k * row_bytes, self.f.filename)
        out = np.empty((len(rows), self.X.shape[1]), self.dtype)
        out[order] = got
        return out

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
        self.f.close()
