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
from ..outputs import check_output_path, h5_written_whole
from ..runtime.signals import signals_held


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
    """The file as text; a UTF-8 byte-order mark (Excel writes one) is not part of a cell."""
    return (gzip.open(path, "rt", newline="", encoding="utf-8-sig") if path.endswith(".gz")
            else open(path, newline="", encoding="utf-8-sig"))


DELIMITERS = {",": ",", ";": ";", "tab": "\t", "\\t": "\t", "\t": "\t"}


def csv_layout(path, label_column, sep):
    """(has header, column names or None, label column index, number of columns, the longer of
    the first two lines in bytes). A header is a first row with fewer numeric fields than the
    second (or none at all)."""
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=sep)
        first, second = next(reader, None), next(reader, None)
    # the longer of the first two lines, in characters (bytes, for numbers) with separators
    line_bytes = max(sum(map(len, row)) + len(row) for row in (first or [], second or []))
    if not first:
        raise UsageError(f"{path} is empty")
    header = _numeric_fields(first) == 0 or (
        second is not None and _numeric_fields(first) < _numeric_fields(second))
    names = [c.strip() for c in first] if header else None
    ncols = len(first)
    if ncols < 2:
        raise UsageError(f"{path}: one column only with delimiter {sep!r}; name the file's "
                         "delimiter with --delimiter (',' ';' or tab)")
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
    return header, names, idx, ncols, line_bytes


def _numeric_fields(row):
    count = 0
    for value in row:
        try:
            float(value)
            count += 1
        except ValueError:
            pass
    return count


def read_csv(path, label_column, delimiter):
    """Rows of a CSV (or .csv.gz) file through pyarrow's streaming reader: float32 features, and
    the label column as text (text class names are mapped to integers when the file is written,
    numbers stay numbers). Quoted fields are read as quoted; an empty cell, or text in a feature
    column, is one error naming the row and column."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    sep = DELIMITERS.get(delimiter, delimiter)
    header, names, idx, ncols, line_bytes = csv_layout(path, label_column, sep)
    label_name = names[idx] if names else f"column {idx}"
    types = {f"f{c}": (pa.string() if c == idx else pa.float32()) for c in range(ncols)}
    # 1 MiB blocks (pyarrow's default) convert in parallel (16 MiB blocks ran at half speed); a
    # block must hold whole lines, so wide files get blocks of a few of their lines
    block = max(1 << 20, 4 * line_bytes)
    try:
        reader = pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(autogenerate_column_names=True,
                                                 skip_rows=int(header), block_size=block),
            parse_options=pacsv.ParseOptions(delimiter=sep),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True))
        row = 1 + int(header)  # the file line of the batch's first row
        for batch in reader:
            yield _csv_batch(batch, idx, ncols, names, label_name, path, row, sep)
            row += batch.num_rows
    except pa.ArrowInvalid as e:
        if "straddl" in str(e) or "Empty CSV file or block" in str(e):
            raise UsageError(f"{path}: a line is longer than {block:,} bytes, the most the CSV "
                             f"reader takes at a time (4 x its first line); such a file is "
                             "better converted from .npz") from None
        raise UsageError(text_cell(path, sep, header, names, idx, str(e))) from None


def cell_text(path, sep, line, column):
    """The text of one cell (file line `line`, from 1), read again on an error path only."""
    with _open_text(path) as fh:
        for number, row in enumerate(csv.reader(fh, delimiter=sep), start=1):
            if number == line:
                return row[column] if column < len(row) else ""
    return ""


def text_cell(path, sep, header, names, label, error):
    """The message for text in a feature column: the first such cell's line, column and value,
    found by reading the file again (only on this error path)."""
    with _open_text(path) as fh:
        for line, row in enumerate(csv.reader(fh, delimiter=sep), start=1):
            if line == 1 and header:
                continue
            for c, value in enumerate(row):
                if c == label:
                    continue
                try:
                    float(value)
                except ValueError:
                    name = names[c] if names else f"column {c}"
                    return (f"{path}: line {line}: {name!r} holds text ({value!r}) where a "
                            "number belongs; name the label with --label-column, drop other text "
                            "columns")
    return f"{path}: {error.splitlines()[0]}"


def _csv_batch(batch, idx, ncols, names, label_name, path, first_line, sep):
    import pyarrow.compute as pc
    if batch.num_columns != ncols:
        raise UsageError(f"{path}: rows have {batch.num_columns} columns, the first has {ncols}")
    for c in range(ncols):
        column = batch.column(c)
        if column.null_count:
            line = first_line + pc.index(pc.is_null(column), True).as_py()
            name = names[c] if names else f"column {c}"
            value = cell_text(path, sep, line, c)
            what = "is empty" if not value.strip() else \
                f"holds {value.strip()!r}, a missing-value marker"
            raise UsageError(f"{path}: line {line}: {name!r} {what}; fill or drop the rows with "
                             "missing values first")
    x = np.column_stack([batch.column(c).to_numpy() for c in range(ncols) if c != idx])
    labels = batch.column(idx).to_numpy(zero_copy_only=False)  # object array of str
    return x.astype(np.float32, copy=False), labels


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
            raise UsageError(
                f"{labels}: {ydims} labels do not match the {xdims[0]} images of {images}"
            )
        width = int(np.prod(xdims[1:]))
        for s in range(0, xdims[0], chunk):
            n = min(chunk, xdims[0] - s)
            x = np.frombuffer(fx.read(n * width * xd.itemsize), xd).reshape(n, width)
            yield x.astype(np.float32), np.frombuffer(fy.read(n * yd.itemsize), yd)


# -- writing ------------------------------------------------------------------------------------
CHUNK_BYTES = 4 << 20  # at most this much of X in one HDF5 chunk


def stored_chunk_rows(rows, features, itemsize=4):
    """Rows per stored HDF5 chunk: at most `rows`, and at most CHUNK_BYTES of a row's features.
    HDF5 stores whole chunks, so 65,536-row chunks of 10,000 features made a 50-row file 2.6 GB;
    4 MiB chunks still read at full speed when streaming."""
    return max(1, min(int(rows), CHUNK_BYTES // max(1, features * itemsize)))


class H5Writer:
    """X grown chunk by chunk; y kept (it is small) and written at the end as int64 labels when all
    values are whole numbers, else float32 targets."""

    def __init__(self, f, features, chunk, compression):
        self.f = f
        chunk = stored_chunk_rows(chunk, features)
        opts = {} if compression == "none" else {"compression": compression}
        with signals_held():  # not inside h5py's write callbacks (runtime/signals.py)
            self.X = self.f.create_dataset("X", (0, features), np.float32,
                                           maxshape=(None, features), chunks=(chunk, features),
                                           **opts)
        self.y, self.opts, self.chunk, self.n = [], opts, chunk, 0

    def write(self, x, y):
        with signals_held():
            self.X.resize(self.n + len(x), axis=0)
            self.X[self.n:self.n + len(x)] = x
        self.y.append(np.asarray(y))
        self.n += len(x)

    def labels(self):
        return np.concatenate(self.y) if self.y else np.zeros(0)

    def close(self, class_names=None, values=False):
        """Write y: class names as int64 indices into class_names (stored as the `classes`
        attribute), whole numbers as int64 labels (unless `values`: --targets values), anything
        else as float32 targets."""
        y = self.labels()
        if class_names is not None:
            y = class_indices(y, class_names)
        elif not values and is_whole(y):
            y = y.astype(np.int64)
        else:
            y = y.astype(np.float32)
        with signals_held():
            ds = self.f.create_dataset("y", data=y, chunks=(min(self.chunk, max(len(y), 1)),)
                                       + y.shape[1:], **self.opts)
            if class_names is not None:
                ds.attrs["classes"] = np.array(class_names, dtype=h5py.string_dtype())
        return self.n


def text_classes(writers, source):
    """The sorted class names when the labels are text (a CSV's label column), else None; numbers
    written as text ("3", "0.5") are numbers."""
    import pyarrow as pa
    import pyarrow.compute as pc
    labels = np.concatenate([w.labels() for w in writers])
    if labels.dtype != object:
        return None
    text = pa.array(labels, type=pa.string())  # vectorised from here on
    if text.null_count or pc.any(pc.equal(text, "")).as_py():
        raise UsageError(f"{source}: the label column has empty cells")
    try:
        pc.cast(text, pa.float64())
    except pa.ArrowInvalid:
        return sorted(pc.unique(text).to_pylist())
    for w in writers:
        w.y = [chunk.astype(np.float64) for chunk in w.y]
    return None


def is_whole(y):
    return y.ndim == 1 and bool(np.all(np.isfinite(y))) and bool(np.all(y == np.round(y)))


def class_indices(labels, class_names):
    """int64 index of each text label in the sorted class_names."""
    import pyarrow as pa
    import pyarrow.compute as pc
    return (
        pc.index_in(
            pa.array(labels, type=pa.string()), value_set=pa.array(class_names, type=pa.string())
        )
        .to_numpy()
        .astype(np.int64)
    )


def stratified_train_mask(labels, fraction, seed, by_class=True):
    """True for rows that go to the training file: `fraction` of each class (or, not by_class,
    of all rows), chosen at random."""
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), bool)
    rng = np.random.default_rng(seed)
    keys = labels if labels.ndim == 1 and by_class else np.zeros(len(labels))
    for value in np.unique(keys):
        rows = np.flatnonzero(keys == value)
        rng.shuffle(rows)
        mask[rows[:int(round(fraction * len(rows)))]] = True
    return mask


def check_split(mask, fraction, source, outs, by_class=True):
    """Both files of a split must get rows: a tiny file (or a fraction near 0 or 1) can round a
    side to none."""
    counts = (int(mask.sum()), int((~mask).sum()))
    for out, n in zip(outs, counts):
        if n == 0:
            raise UsageError(f"--split {fraction:g} of the {len(mask)} rows of {source} ("
                             f"{'per class, ' if by_class else ''}rounded) leaves {out} with no "
                             "rows; use more rows or another fraction" + (
                                 " (labels that are regression targets: --targets values "
                                 "splits rows, not classes)" if by_class else ""))


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
            return read_csv(cfg.source, cfg.label_column, cfg.delimiter)
        return read_idx(cfg.source, cfg.labels, cfg.chunk_rows)

    try:
        first = next(iter(chunks()), None)
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {cfg.source} as {fmt}: {e}") from None
    if first is None:
        raise UsageError(f"{cfg.source} holds no rows")
    features = first[0].shape[1]
    mask = None
    if cfg.split:  # first pass: labels only, for an exact stratified split
        labels = np.concatenate([y for _, y in chunks()])
        by_class = are_classes(cfg, labels)
        mask = stratified_train_mask(labels, cfg.split, cfg.seed, by_class)
        check_split(mask, cfg.split, cfg.source, outs, by_class)
    with contextlib.ExitStack() as files:  # each output appears whole, or not at all
        h5s = [files.enter_context(h5_written_whole(p)) for p in outs]
        row, counts, names = write_rows(cfg, chunks, mask, features, h5s)
    Log().info(f"converted {row:,} rows x {features} features from {cfg.source} ({fmt}) -> "
               + ", ".join(f"{p} ({n:,} rows)" for p, n in zip(outs, counts))
               + (f"; {len(names)} classes: {', '.join(names[:10])}"
                  f"{', ...' if len(names) > 10 else ''}" if names else ""))
    return outs


def write_rows(cfg, chunks, mask, features, files):
    """Every row into files[0], or split by mask into files[0] (True) and files[1] (open h5py
    Files); returns (rows read, rows written per file)."""
    writers = [H5Writer(f, features, cfg.chunk_rows, cfg.compression) for f in files]
    row = 0
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
    names = text_classes(writers, cfg.source)
    check_targets(cfg, names, np.concatenate([w.labels() for w in writers]))
    return row, [w.close(names, cfg.targets == "values") for w in writers], names


def are_classes(cfg, labels):
    """Whether the labels are classes (a split keeps each one's share): --targets classes, or
    auto with text or whole-number labels."""
    if cfg.targets != "auto":
        return cfg.targets == "classes"
    if labels.dtype == object:  # a CSV's column: numbers as text count as numbers
        try:
            labels = labels.astype(np.float64)
        except ValueError:
            return True
    return is_whole(labels)


def check_targets(cfg, names, y):
    """--targets classes needs whole numbers or text, values needs numbers."""
    if cfg.targets == "values" and names is not None:
        raise UsageError(f"--targets values: the labels of {cfg.source} are text "
                         f"({', '.join(names[:3])}, ...), not numbers")
    if cfg.targets == "classes" and names is None and not is_whole(y):
        raise UsageError(f"--targets classes: the labels of {cfg.source} are not all whole "
                         "numbers (use --targets values for regression targets)")


def run(cfg, explicit, comm=None):
    return convert(cfg)
