"""Per-rank data: read-only HDF5 reads of only the rows a rank owns (plan.BatchPlan says which), the
data checks every reader runs, the global shuffle's row exchange, and the per-epoch batch order.

The rows a rank owns are one strided block selection over the full batches (h5py.MultiBlockSlice,
read as one hyperslab) plus its part of the last, shorter batch.
"""
import atexit
import functools
import glob
import json
import os
import queue
import shutil
import tempfile
import threading
import zlib
from dataclasses import dataclass

import h5py
import numpy as np

from .errors import UsageError
from .kernels import all_finite  # one pass, no temporary the size of the shard
from .losses import LOSSES
from .plan import even_part, position_owners


def open_h5(spec):
    """Open a data file read-only with file locking off (locks fail on many shared filesystems and
    are not needed for readers). `spec` is one path, or several (comma-separated paths and/or
    quoted glob patterns): then one virtual file that concatenates their rows (data_files)."""
    files = data_files(spec)
    path = files[0] if len(files) == 1 else virtual_file(tuple(files))
    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise UsageError(f"data file not found: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot open {path} as HDF5: {e}") from None


def data_files(spec):
    """The files a --data value names, in sorted path order: one path, comma-separated paths,
    glob patterns ('shards/part-*.h5', quoted so the shell leaves them alone), or a mix."""
    files = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        if glob.has_magic(part):
            matches = glob.glob(part)
            if not matches:
                raise UsageError(f"data pattern {part!r} matches no file")
            files += matches
        else:
            files.append(part)
    if not files:
        raise UsageError(f"no data file in {spec!r}")
    return sorted(set(files)) if len(files) > 1 else files


def canonical_spec(spec):
    """The expanded, sorted list of absolute file paths of a --data value (what a checkpoint
    records, so a resumed run reads the same files even when a pattern would now match more, or
    when it starts in another working directory: a job script, a requeue)."""
    return ",".join(os.path.abspath(p) for p in data_files(spec))


IDENTITY_BYTES = 65536


def file_identity(path):
    """[size, fingerprint] of a data file: its size and a CRC-32 of its first and last 64 KiB
    (HDF5's superblock, root group and dataset headers, and the end of the data), so a resumed
    run can tell its file from another one of the same name."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(IDENTITY_BYTES)
            fh.seek(max(0, size - IDENTITY_BYTES))
            tail = fh.read(IDENTITY_BYTES)
    except FileNotFoundError:
        raise UsageError(f"data file not found: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    return [size, f"{zlib.crc32(tail, zlib.crc32(head)):08x}"]


def spec_identity(spec):
    """{file: [size, fingerprint]} of every file a --data value names (see file_identity)."""
    return {p: file_identity(p) for p in data_files(spec)} if spec else {}


@functools.cache
def virtual_file(files):
    """An HDF5 virtual file (in a temporary folder of this process) whose datasets concatenate the
    rows of every file's dataset of the same name: the rest of mpinn reads it as one file, a
    rank's rows may span two files, and nothing is copied. The files must agree on each dataset's
    dtype, row shape and attributes (the class names); the error names the file that does not."""
    first = describe_rows(files[0])
    layouts = {}
    for path in files:
        here = describe_rows(path)
        if set(here) != set(first):
            raise UsageError(f"{path} has datasets {sorted(here)}; {files[0]} has {sorted(first)}: "
                             "all data files must hold the same datasets")
        for name, (rows, tail, dtype, attrs) in here.items():
            if (tail, dtype, attrs) != first[name][1:]:
                what = ("row shape" if tail != first[name][1] else
                        "dtype" if dtype != first[name][2] else "attributes (class names)")
                raise UsageError(f"{path}:{name} differs from {files[0]}:{name} in {what} "
                                 f"({tail or 'scalar'} {dtype} vs {first[name][1] or 'scalar'} "
                                 f"{first[name][2]}); all data files must agree")
            layouts.setdefault(name, []).append((os.path.abspath(path), rows))
    folder = tempfile.mkdtemp(prefix="mpinn-data-")
    atexit.register(shutil.rmtree, folder, True)
    out = os.path.join(folder, "concatenated.h5")
    with h5py.File(out, "w") as f, h5py.File(files[0], "r", locking=False) as template:
        for name, sources in layouts.items():
            _, tail, dtype, _ = first[name]
            total = sum(rows for _, rows in sources)
            layout = h5py.VirtualLayout(shape=(total, *tail), dtype=dtype)
            start = 0
            for src, rows in sources:
                layout[start:start + rows] = h5py.VirtualSource(src, name, shape=(rows, *tail))
                start += rows
            ds = f.create_virtual_dataset(name, layout)
            for key, value in template[name].attrs.items():  # the class names, if any
                ds.attrs[key] = value
    return out


def describe_rows(path):
    """{dataset: (rows, row shape, dtype, attributes)} of a data file's top-level datasets."""
    try:
        f = h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise UsageError(f"data file not found: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot open {path} as HDF5: {e}") from None
    with f:
        out = {}
        for name, ds in f.items():
            if isinstance(ds, h5py.Dataset) and ds.ndim >= 1:
                attrs = tuple(sorted((k, json.dumps(_plain(v))) for k, v in ds.attrs.items()))
                out[name] = (ds.shape[0], tuple(ds.shape[1:]), str(ds.dtype), attrs)
        rows = {r for r, *_ in out.values()}
        if len(rows) > 1:
            raise UsageError(f"{path}: its datasets have different row counts "
                             f"({', '.join(f'{k} {v[0]}' for k, v in out.items())})")
        return out


def _plain(value):
    """An attribute value as JSON-able Python (str for bytes), to compare files and copy it."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


@dataclass(frozen=True)
class Columns:
    """Where and what the inputs and targets are in a data file."""
    x_key: str = "X"
    y_key: str = "y"
    loss: str = "cross_entropy"


def _dataset(f, key, path, what):
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise UsageError(f"{path}: no dataset {key!r} for {what} (use --{'x' if what == 'inputs' else 'y'}-key"
                         f" to name another; found: {', '.join(sorted(f.keys())) or 'nothing'})")
    return f[key]


def inspect(f, path, cols, need_y=True):
    """Check shapes and dtypes without reading data. Returns (n_rows, n_features, n_targets or None);
    n_targets is the width of y for mse and None for class labels."""
    X = _dataset(f, cols.x_key, path, "inputs")
    if X.ndim != 2:
        raise UsageError(f"{path}:{cols.x_key} must be 2-D (rows x features); it has shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise UsageError(f"{path}:{cols.x_key} must be numeric; it has dtype {X.dtype}")
    n, n_features = X.shape
    if n == 0:
        raise UsageError(f"{path}:{cols.x_key} is empty (0 rows)")
    if not need_y:
        return n, n_features, None
    y = _dataset(f, cols.y_key, path, "targets")
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise UsageError(f"{path}:{cols.y_key} must have one entry per row of {cols.x_key} "
                         f"({n}); it has shape {y.shape}")
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
            return [str(_plain(v)) for v in f[y_key].attrs["classes"]]
    return None


def _read_selection(ds, out, selections):
    """Read (file selection, rows) pieces of ds into consecutive rows of out, converting dtype."""
    row = 0
    for sel, rows in selections:
        if rows:
            ds.read_direct(out, source_sel=np.s_[sel], dest_sel=np.s_[row:row + rows])
        row += rows
    return out


def plan_selections(plan):
    """The file selections (with their row counts) that read exactly plan.owned_rows(), in order."""
    sel = []
    off, cnt = plan.full_part()
    if plan.n_full and cnt:
        sel.append((h5py.MultiBlockSlice(start=off, stride=plan.batch, count=plan.n_full, block=cnt),
                    plan.n_full * cnt))
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
    """x (float32) must be finite. When it is not and the file stores wider floats,
    read_native() gives the same rows as stored (only on this error path): all finite there
    means they overflow float32 (1e300 is finite in float64 and inf in float32), which is not
    "NaN or inf" and wants another fix."""
    if all_finite(x.reshape(-1)):
        return
    if ds.dtype.kind == "f" and ds.dtype.itemsize > 4:
        native = np.asarray(read_native())
        if np.isfinite(native).all():
            raise UsageError(f"{path}:{key} holds values beyond float32's range (largest "
                             f"|value| {float(np.abs(native).max()):.3g}, float32 ends at "
                             "3.4e+38); mpinn trains in float32: rescale the data")
    raise UsageError(f"{path}:{key} contains NaN or inf values")


def read_rows(path, cols, selections, n_targets, want_x=True, want_y=True):
    """Read the rows named by `selections` (see plan_selections) as float32 inputs and int64 labels
    or float32 (rows, n_targets) targets. Only those rows are read; an input or target not wanted
    (a pipeline stage that does not need it) is returned as None and not read at all."""
    n = sum(rows for _, rows in selections)
    x = y = None
    with open_h5(path) as f:
        if want_x:
            X = f[cols.x_key]
            x = _read_selection(X, np.empty((n, X.shape[1]), np.float32), selections)
            _check_finite(path, X, cols.x_key, x, lambda: _read_selection(
                X, np.empty((n, X.shape[1]), X.dtype), selections))
        if not want_y:
            return x, y
        y_ds = f[cols.y_key]
        if n_targets is None:
            y = _read_selection(y_ds, np.empty(n, np.int64), selections)
            if n and y.min() < 0:
                raise UsageError(f"{path}:{cols.y_key} has negative class labels (min {y.min()})")
        else:
            shape = (n,) if y_ds.ndim == 1 else (n, n_targets)
            y = _read_selection(y_ds, np.empty(shape, np.float32), selections).reshape(n, n_targets)
            _check_finite(path, y_ds, cols.y_key, y, lambda: _read_selection(
                y_ds, np.empty(shape, y_ds.dtype), selections))
    return x, y


def read_inputs(f, path, x_key, selections):
    """Only the inputs of the selected rows of the open file f (prediction)."""
    n = sum(rows for _, rows in selections)
    X = f[x_key]
    x = _read_selection(X, np.empty((n, X.shape[1]), np.float32), selections)
    _check_finite(path, X, x_key, x, lambda: _read_selection(
        X, np.empty((n, X.shape[1]), X.dtype), selections))
    return x


def epoch_permutation(n_rows, seed, epoch):
    """The global shuffle's order of an epoch: position p holds file row perm[p]."""
    return np.random.default_rng([seed, epoch, 2**31]).permutation(n_rows)


def rank_permutation(n, seed, epoch, rank):
    """--shuffle rank: the order of a reader's n rows in an epoch (in memory and streamed)."""
    return np.random.default_rng([seed, epoch, rank]).permutation(n)


def global_shuffle_rows(n_rows, batch, seed, epoch, rank, size):
    """The file rows this rank holds in an epoch of the global shuffle, in its step order."""
    owner, _ = position_owners(n_rows, batch, size)
    return epoch_permutation(n_rows, seed, epoch)[owner == rank]


def global_shuffle(comm, x, y, n_rows, batch, seed, epoch):
    """This rank's rows for one epoch of the global shuffle (see GlobalShuffle), fresh buffers."""
    return GlobalShuffle(comm, x, y, n_rows, batch).epoch(seed, epoch)


class GlobalShuffle:
    """This rank's rows for each epoch under a seeded permutation of all rows: position p of the
    epoch holds file row perm[p], every rank owns its usual positions, so results are the same
    for any number of ranks. x, y are the rows this rank loaded (file row f at local index
    local[f] of rank owner[f], the BatchPlan split).

    The rows move in `rounds` Alltoallv rounds, each over one slice of the epoch's positions, into
    output buffers allocated once and refilled every epoch: besides the loaded rows and those
    buffers, an exchange holds only a round's send and receive rows (about 2/rounds of a shard)
    and the epoch's permutation."""

    def __init__(self, comm, x, y, n_rows, batch, rounds=16):
        self.comm, self.arrays, self.n = comm, (x, y), n_rows
        self.owner, self.local = position_owners(n_rows, batch, comm.size)
        mine = int(np.count_nonzero(self.owner == comm.rank))
        self.out = tuple(None if a is None else np.empty((mine,) + a.shape[1:], a.dtype)
                         for a in self.arrays)
        self.step = -(-n_rows // max(1, rounds))

    def epoch(self, seed, epoch):
        perm = epoch_permutation(self.n, seed, epoch)
        filled = 0
        for start in range(0, self.n, self.step):
            filled += self._round(perm, start, min(self.n, start + self.step), filled)
        return self.out

    def _round(self, perm, start, end, filled):
        """Positions start..end: send the rows I hold for them, receive mine. -> rows received."""
        rank, size = self.comm.rank, self.comm.size
        rows = perm[start:end]                 # the file row each position takes
        src = self.owner[rows]                 # the rank that holds it
        dst = self.owner[start:end]            # the rank that owns the position
        held = np.flatnonzero(src == rank)
        held = held[np.argsort(dst[held], kind="stable")]  # by destination, positions ascending
        send_rows = self.local[rows[held]]
        send_counts = np.bincount(dst[held], minlength=size)
        want = np.flatnonzero(dst == rank)     # my positions here: my next rows in step order
        recv_counts = np.bincount(src[want], minlength=size)
        place = filled + np.argsort(src[want], kind="stable")  # rows arrive grouped by source
        for a, out in zip(self.arrays, self.out):
            if a is None:
                continue
            width = int(np.prod(a.shape[1:])) if a.ndim > 1 else 1
            send = a[send_rows]
            got = np.empty((len(want),) + a.shape[1:], a.dtype)
            self.comm.alltoallv_(send.reshape(-1), send_counts * width, got.reshape(-1),
                                 recv_counts * width)
            out[place] = got
        return len(want)


class EpochBatches:
    """This rank's batches for one epoch: step k yields its part of global batch k. Fixed order
    gives views of the local arrays; shuffled order permutes the rows this rank owns, seeded by
    (seed, epoch, rank), and gathers them into preallocated buffers."""

    def __init__(self, x, y, counts, shuffle, seed, epoch, rank, rows=None):
        """x or y may be None (a pipeline stage that does not read it): its batches are None.
        rows: the file row of each local row (for dropout's masks); `rows_of(k)` gives batch k's."""
        self.arrays, self.counts, self.rows = (x, y), counts, rows
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.perm = None
        if shuffle:
            n = int(np.sum(counts))
            self.perm = rank_permutation(n, seed, epoch, rank)
            m = int(counts.max()) if len(counts) else 0
            self.buffers = tuple(None if a is None else np.empty((m,) + a.shape[1:], a.dtype)
                                 for a in self.arrays)

    def rows_of(self, k):
        """The file rows of this rank's part of batch k, in the order __call__ gives them."""
        if self.rows is None:
            return None
        s, c = int(self.starts[k]), int(self.counts[k])
        return self.rows[s:s + c] if self.perm is None else self.rows[self.perm[s:s + c]]

    def close(self):
        pass

    def __call__(self, k):
        s, c = int(self.starts[k]), int(self.counts[k])
        if self.perm is None:
            return tuple(None if a is None else a[s:s + c] for a in self.arrays)
        idx = self.perm[s:s + c]
        out = []
        for a, buf in zip(self.arrays, self.buffers):
            if a is not None:
                np.take(a, idx, axis=0, out=buf[:c])
            out.append(None if a is None else buf[:c])
        return tuple(out)


def read_file_rows(X, rows):
    """float32 inputs of the given file rows (unique, any order) from the open dataset X: runs of
    consecutive rows as slices, scattered rows as one sorted selection."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    out = np.empty((len(rows), X.shape[1]), np.float32)
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
    each run of consecutive rows, from the page cache when the file is there: about 3x faster
    than HDF5's selections for scattered rows, and nothing stays mapped or resident (memory maps
    were faster still, but the kernel maps the pages around every touched row, so a process
    soon holds its whole slice). Anything else (filters, a virtual dataset over many files) is
    read through HDF5 (read_file_rows)."""

    MAX_RANGES = 4096

    def __init__(self, path, x_key):
        self.f = open_h5(path)
        self.X = self.f[x_key]
        self.layout, self.fd = self._layout(), None
        if self.layout:
            self.fd = os.open(self.f.filename, os.O_RDONLY)

    def _layout(self):
        """(rows per stored range, the ranges' byte offsets) when the rows can be read directly."""
        X = self.X
        if (X.is_virtual or X.id.get_create_plist().get_nfilters() or X.ndim != 2
                or X.dtype.kind not in "fiu"):
            return None
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

    def read(self, rows):
        if not self.layout or not len(rows):
            return read_file_rows(self.X, rows)
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
        out = np.empty((len(rows), self.X.shape[1]), np.float32)
        out[order] = got
        return out

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
        self.f.close()


@dataclass
class Stream:
    """Training inputs read from the file as training goes (startup.streaming decides): the file,
    the rows of one chunk, and all of the file's labels (set once they are read)."""
    path: str
    x_key: str
    chunk_rows: int
    labels: object = None

    def batches(self, file_rows, counts, with_rows):
        return StreamedBatches(self.path, self.x_key, self.labels, file_rows, counts,
                               self.chunk_rows, with_rows)

    def first_rows(self, plan):
        """The inputs of this rank's first step (to warm the kernels up)."""
        rows = plan.owned_rows()[:max(1, int(plan.local_counts()[0]))]
        source = RowSource(self.path, self.x_key)
        try:
            return source.read(rows)
        finally:
            source.close()


class StreamedBatches:
    """This rank's batches for one epoch read from the file as training goes: the epoch's file
    rows in step order are cut into chunks of whole steps (at most chunk_rows rows), and a
    background thread reads the next chunk while the current one trains. At most three chunks are
    in memory (the one training, one read ahead, one being read). Labels come from `labels` (all
    of the file's, kept in memory: they are small). Gives what EpochBatches gives for the same
    rows, so streamed training ends with the same weights as training from memory."""

    def __init__(self, path, x_key, labels, file_rows, counts, chunk_rows, with_rows):
        self.path, self.x_key, self.labels, self.file_rows = path, x_key, labels, file_rows
        self.counts, self.with_rows = counts, with_rows
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.chunks = []  # (first step, first row, end row)
        step = 0
        while step < len(counts):
            first, rows = step, 0
            while step < len(counts) and (step == first or rows + counts[step] <= chunk_rows):
                rows += int(counts[step])
                step += 1
            self.chunks.append((first, int(self.starts[first]), int(self.starts[first]) + rows))
        self.chunk_of_step = np.repeat(np.arange(len(self.chunks)),
                                       np.diff([c[0] for c in self.chunks] + [len(counts)]))
        self.queue, self.thread, self.current, self.stopped = queue.Queue(maxsize=1), None, None, False

    def _read_ahead(self, first_chunk):
        source = None
        try:
            source = RowSource(self.path, self.x_key)
            for j in range(first_chunk, len(self.chunks)):
                if self.stopped:
                    return
                _, a, b = self.chunks[j]
                rows = self.file_rows[a:b]
                x = source.read(rows)
                _check_finite(self.path, source.X, self.x_key, x,
                              lambda: source.X[np.sort(rows)])
                self.queue.put((j, x, None))
        except Exception as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self.queue.put((None, None, e))
        finally:
            if source is not None:
                source.close()

    def _chunk(self, j):
        if self.current is not None and self.current[0] == j:
            return self.current[1]
        if self.thread is None:
            self.thread = threading.Thread(target=self._read_ahead, args=(j,), daemon=True,
                                           name="mpinn-read-ahead")
            self.thread.start()
        got, x, error = self.queue.get()
        if error is not None:
            raise error
        assert got == j, "streamed batches are taken in step order"
        self.current = (j, x)
        return x

    def rows_of(self, k):
        if not self.with_rows:
            return None
        s, c = int(self.starts[k]), int(self.counts[k])
        return self.file_rows[s:s + c]

    def __call__(self, k):
        s, c = int(self.starts[k]), int(self.counts[k])
        j = int(self.chunk_of_step[k])
        x = self._chunk(j)
        off = s - self.chunks[j][1]
        return x[off:off + c], self.labels[self.file_rows[s:s + c]]

    def close(self):
        """Stop the read-ahead (an epoch ended early: a signal, early stopping, --steps)."""
        self.stopped = True
        if self.thread is not None:
            while self.thread.is_alive():
                try:
                    self.queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self.thread.join()
