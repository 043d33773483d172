"""`mpinn data convert`: NumPy .npz, CSV and MNIST IDX into mpinn's HDF5 layout (X float32 rows x
features, y int64 labels or float32 targets), streaming in chunks so a file larger than memory
converts; chunked output datasets, optional compression, and --split FRACTION for a stratified
train/test pair (one extra pass over the labels only).
"""
import contextlib
import csv
import gzip
import os
import zipfile

import h5py
import numpy as np
from numpy.lib import format as npy_format

from ..errors import UsageError
from ..log import Log
from ..outputs import check_output_path, written_whole


# -- readers: each yields (x chunk float32 rows x features, y chunk) in file order ---------------
def _npy_member(zf, name, path):
    member = name if name.endswith(".npy") else name + ".npy"
    if member not in zf.namelist():
        keys = ", ".join(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
        raise UsageError(f"{path}: no array {name!r} (found: {keys or 'none'})")
    fh = zf.open(member)
    version = npy_format.read_magic(fh)
    read_header = (npy_format.read_array_header_1_0 if version == (1, 0)
                   else npy_format.read_array_header_2_0)
    shape, fortran, dtype = read_header(fh)
    if fortran:
        raise UsageError(f"{path}:{name} is stored in Fortran order; save it C-ordered")
    return fh, shape, dtype


def _npy_rows(fh, shape, dtype, start, count):
    width = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    raw = fh.read(count * width * dtype.itemsize)
    return np.frombuffer(raw, dtype).reshape((count,) + tuple(shape[1:]))


def read_npz(path, x_key, y_key, chunk):
    with zipfile.ZipFile(path) as zf:
        fx, xs, xd = _npy_member(zf, x_key, path)
        fy, ys, yd = _npy_member(zf, y_key, path)
        if ys[0] != xs[0]:
            raise UsageError(f"{path}: {y_key} has {ys[0]} rows, {x_key} has {xs[0]}")
        for s in range(0, xs[0], chunk):
            n = min(chunk, xs[0] - s)
            yield (_npy_rows(fx, xs, xd, s, n).reshape(n, -1),
                   _npy_rows(fy, ys, yd, s, n).reshape((n,) + tuple(ys[1:])))


def _open_text(path):
    return gzip.open(path, "rt") if path.endswith(".gz") else open(path, newline="")


def csv_layout(path, label_column):
    """(has header, column names or None, label column index, number of columns)."""
    with _open_text(path) as fh:
        first = next(csv.reader(fh), None)
    if not first:
        raise UsageError(f"{path} is empty")
    try:
        [float(v) for v in first]
        header = False
    except ValueError:
        header = True
    names = [c.strip() for c in first] if header else None
    ncols = len(first)
    if label_column.lstrip("-").isdigit():
        idx = int(label_column)
        if not -ncols <= idx < ncols:
            raise UsageError(f"--label-column {idx} is out of range for {ncols} columns")
        idx %= ncols
    elif names and label_column in names:
        idx = names.index(label_column)
    else:
        raise UsageError(f"--label-column {label_column!r}: no such column in {path}"
                         + (f" (columns: {', '.join(names)})" if names else " (no header)"))
    return header, names, idx, ncols


def read_csv(path, label_column, chunk):
    header, _, idx, ncols = csv_layout(path, label_column)
    keep = [c for c in range(ncols) if c != idx]
    with _open_text(path) as fh:
        if header:
            fh.readline()
        while True:
            try:
                block = np.loadtxt(fh, delimiter=",", max_rows=chunk, ndmin=2, dtype=np.float64)
            except ValueError as e:
                raise UsageError(f"{path}: not a numeric CSV row: {e}") from None
            if block.shape[0] == 0:
                return
            if block.shape[1] != ncols:
                raise UsageError(f"{path}: rows have {block.shape[1]} columns, the first has {ncols}")
            yield block[:, keep].astype(np.float32), block[:, idx]
            if block.shape[0] < chunk:
                return


IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_header(fh, path):
    magic = fh.read(4)
    if len(magic) != 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_TYPES:
        raise UsageError(f"{path} is not an IDX file (MNIST format)")
    dims = np.frombuffer(fh.read(4 * magic[3]), ">i4").tolist()
    return np.dtype(IDX_TYPES[magic[2]]), dims


def read_idx(images, labels, chunk):
    open_ = lambda p: gzip.open(p, "rb") if p.endswith(".gz") else open(p, "rb")  # noqa: E731
    with open_(images) as fx, open_(labels) as fy:
        xd, xdims = _idx_header(fx, images)
        yd, ydims = _idx_header(fy, labels)
        if len(ydims) != 1 or ydims[0] != xdims[0]:
            raise UsageError(f"{labels}: {ydims} labels do not match the {xdims[0]} images of {images}")
        width = int(np.prod(xdims[1:]))
        for s in range(0, xdims[0], chunk):
            n = min(chunk, xdims[0] - s)
            x = np.frombuffer(fx.read(n * width * xd.itemsize), xd).reshape(n, width)
            yield x.astype(np.float32), np.frombuffer(fy.read(n * yd.itemsize), yd)


# -- writing ------------------------------------------------------------------------------------
class H5Writer:
    """X grown chunk by chunk; y kept (it is small) and written at the end as int64 labels when all
    values are whole numbers, else float32 targets."""

    def __init__(self, path, features, chunk, compression):
        self.f = h5py.File(path, "w")
        opts = {} if compression == "none" else {"compression": compression}
        self.X = self.f.create_dataset("X", (0, features), np.float32, maxshape=(None, features),
                                       chunks=(chunk, features), **opts)
        self.y, self.opts, self.chunk, self.n = [], opts, chunk, 0

    def write(self, x, y):
        self.X.resize(self.n + len(x), axis=0)
        self.X[self.n:self.n + len(x)] = x
        self.y.append(np.asarray(y))
        self.n += len(x)

    def close(self):
        y = np.concatenate(self.y) if self.y else np.zeros(0)
        if y.ndim == 1 and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            y = y.astype(np.float32)
        self.f.create_dataset("y", data=y, chunks=(min(self.chunk, max(len(y), 1)),) + y.shape[1:],
                              **self.opts)
        self.f.close()
        return self.n


def stratified_train_mask(labels, fraction, seed):
    """True for rows that go to the training file: `fraction` of each class, chosen at random."""
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), bool)
    rng = np.random.default_rng(seed)
    keys = labels if labels.ndim == 1 else np.zeros(len(labels))
    for value in np.unique(keys):
        rows = np.flatnonzero(keys == value)
        rng.shuffle(rows)
        mask[rows[:int(round(fraction * len(rows)))]] = True
    return mask


def convert(cfg):
    fmt = cfg.format
    if fmt == "auto":
        low = cfg.source.lower()
        fmt = ("npz" if low.endswith(".npz") else "csv" if low.endswith((".csv", ".csv.gz"))
               else "idx" if cfg.labels else None)
        if fmt is None:
            raise UsageError(f"cannot tell the format of {cfg.source}: use --format npz|csv|idx")
    for p in [cfg.source] + ([cfg.labels] if fmt == "idx" else []):
        if not p or not os.path.isfile(p):
            raise UsageError(f"input file not found: {p or '(give --labels for IDX images)'}")
    stem = cfg.out[:-3] if cfg.out.endswith(".h5") else cfg.out
    outs = [cfg.out] if not cfg.split else [f"{stem}-train.h5", f"{stem}-test.h5"]
    for p in outs:
        check_output_path(p, overwrite=cfg.overwrite)

    def chunks():
        if fmt == "npz":
            return read_npz(cfg.source, cfg.x_key, cfg.y_key, cfg.chunk_rows)
        if fmt == "csv":
            return read_csv(cfg.source, cfg.label_column, cfg.chunk_rows)
        return read_idx(cfg.source, cfg.labels, cfg.chunk_rows)

    try:
        first = next(iter(chunks()), None)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UsageError(f"cannot read {cfg.source} as {fmt}: {e}") from None
    if first is None:
        raise UsageError(f"{cfg.source} holds no rows")
    features = first[0].shape[1]
    mask = None
    if cfg.split:  # first pass: labels only, for an exact stratified split
        mask = stratified_train_mask(np.concatenate([y for _, y in chunks()]), cfg.split, cfg.seed)
    with contextlib.ExitStack() as files:  # each output appears whole, or not at all
        tmps = [files.enter_context(written_whole(p)) for p in outs]
        row, counts = write_rows(cfg, chunks, mask, features, tmps)
    Log().info(f"converted {row:,} rows x {features} features from {cfg.source} ({fmt}) -> "
               + ", ".join(f"{p} ({n:,} rows)" for p, n in zip(outs, counts)))
    return outs


def write_rows(cfg, chunks, mask, features, paths):
    """Every row into paths[0], or split by mask into paths[0] (True) and paths[1]; returns (rows
    read, rows written per file)."""
    writers = [H5Writer(p, features, cfg.chunk_rows, cfg.compression) for p in paths]
    row = 0
    try:
        for x, y in chunks():
            x = x * np.float32(cfg.scale) if cfg.scale != 1 else x
            if not np.isfinite(x).all():
                raise UsageError(f"{cfg.source}: rows {row}..{row + len(x) - 1} contain NaN or inf")
            if mask is None:
                writers[0].write(x, y)
            else:
                m = mask[row:row + len(x)]
                writers[0].write(x[m], y[m])
                writers[1].write(x[~m], y[~m])
            row += len(x)
    finally:
        counts = [w.close() for w in writers]
    return row, counts


def run(cfg, explicit, comm=None):
    return convert(cfg)
