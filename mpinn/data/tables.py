"""Data in Parquet and NumPy files, read through the same calls as HDF5: a file of these formats
opens as an object with h5py.File's reading surface (keys, `in`, [name], attrs) whose datasets
have h5py.Dataset's (shape, dtype, attrs, read_direct, [rows]), so every reader, check and
message of read.py applies unchanged.

    .npz        its arrays by name (X, y, a weight array...); stored (uncompressed) members are
                memory-mapped, compressed ones read whole on first use
    .npy        one array, the inputs X (predict)
    .parquet    one or many files (a glob, a comma list) whose columns are the table: "y" (the
                --y-key) is the label or target column, --weight-key's column the row weights,
                and X (--x-key's default) every other column, in the file's order; text labels
                become class numbers in sorted order, their names kept (attrs["classes"]), as
                `mpinn data convert` does for CSV. Rows are read a row group at a time (each
                rank decodes only the groups that hold its rows), nothing else is held.
"""
import functools
import zipfile

import numpy as np

from ..errors import UsageError

TABLE_SUFFIXES = (".parquet", ".pq")
ARRAY_SUFFIXES = (".npz", ".npy")


def is_table(path):
    return str(path).lower().endswith(TABLE_SUFFIXES + ARRAY_SUFFIXES)


def open_table(files, not_features=("y",)):
    """The file(s) as a read-only h5py.File look-alike. not_features: the columns of a Parquet
    table that X leaves out (the label and weight columns)."""
    kinds = {str(p).lower().endswith(TABLE_SUFFIXES) for p in files}
    if len(kinds) > 1:
        raise UsageError(f"data files of one --data must be of one format: {', '.join(files)}")
    if kinds == {True}:
        return ParquetTable(files, not_features)
    if len(files) > 1:
        raise UsageError(f"NumPy data is one .npz (or .npy) file; got {len(files)}: join them "
                         "into one, or use HDF5 or Parquet for many files")
    return NumpyArrays(files[0])


SPAN_GAP = 64  # rows: nearer rows are read together with those between them (fewer, larger reads)
SPAN_ROWS = 1 << 14  # rows one such read covers at most: a rank's rows spread over the whole file
# (its block of every batch) must not make one read of the whole file


def spans(rows):
    """Index groups of ascending rows to read together: rows less than SPAN_GAP apart, within
    one SPAN_ROWS-row stretch of the file."""
    cuts = (np.diff(rows) > SPAN_GAP) | (np.diff(rows // SPAN_ROWS) != 0)
    return np.split(np.arange(len(rows)), np.flatnonzero(cuts) + 1)


class Rows:
    """h5py.Dataset's reading surface over rows that `read(a, b)` gives as a NumPy array
    (native dtype): shape, ndim, dtype, attrs, read_direct (slices and h5py.MultiBlockSlice),
    and [a:b] or [sorted row indices]."""

    is_virtual, chunks = False, None

    def __init__(self, name, n_rows, row_shape, dtype, read, attrs=None):
        self.name, self.shape, self.dtype = name, (n_rows, *row_shape), np.dtype(dtype)
        self.ndim, self._read, self.attrs = len(self.shape), read, dict(attrs or {})

    def __len__(self):
        return self.shape[0]

    def _take(self, idx):
        """Rows at ascending indices: each span of nearby rows (spans()) from one read."""
        idx = np.asarray(idx, np.int64)
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        if not len(idx):
            return out
        for part in spans(idx):
            a, b = int(idx[part[0]]), int(idx[part[-1]]) + 1
            out[part] = self._read(a, b)[idx[part] - a]
        return out

    def __getitem__(self, key):
        if key is Ellipsis:
            return self._read(0, self.shape[0])
        if isinstance(key, slice):
            a, b, step = key.indices(self.shape[0])
            return self._read(a, b)[::step] if b > a else self._read(0, 0)
        return self._take(key)

    def read_direct(self, out, source_sel=None, dest_sel=None):
        if source_sel is None or isinstance(source_sel, slice):
            rows = self[source_sel if source_sel is not None else Ellipsis]
        else:  # h5py.MultiBlockSlice
            starts = source_sel.start + source_sel.stride * np.arange(source_sel.count)
            rows = self._take((starts[:, None] + np.arange(source_sel.block)).reshape(-1))
        out[dest_sel if dest_sel is not None else Ellipsis] = rows


class TextLabels(Rows):
    """A text column as class numbers in the sorted order of its distinct values (attrs["classes"]
    names them). The values are scanned once, when first asked for, not at every open."""

    def __init__(self, name, n_rows, table):
        super().__init__(name, n_rows, (), np.int64, self._codes)
        self.table = table

    @functools.cached_property
    def names(self):
        return sorted({str(v) for part in self.table.parts
                       for v in part.read(columns=[self.name]).column(0).unique().to_pylist()
                       if v is not None})

    @property
    def attrs(self):
        return {"classes": np.array(self.names, dtype=object)}

    @attrs.setter
    def attrs(self, value):  # Rows.__init__ sets it; the names are the attributes here
        pass

    def _codes(self, a, b):
        code = {name: i for i, name in enumerate(self.names)}
        return np.array([code.get(str(v), -1) for v in self.table._values(self.name, a, b,
                                                                            text=True)], np.int64)


class _Container:
    """What h5py.File offers a reader: keys, `in`, [name], get, attrs, a context manager."""

    attrs = {}

    def __init__(self, filename, datasets):
        self.filename, self._datasets = filename, datasets

    def keys(self):
        return self._datasets.keys()

    def items(self):
        return self._datasets.items()

    def __contains__(self, key):
        return key in self._datasets

    def __getitem__(self, key):
        return self._datasets[key]

    def get(self, key, default=None):
        return self._datasets.get(key, default)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NumpyArrays(_Container):
    """A .npz file's arrays (memory-mapped where stored uncompressed), or a .npy file as X."""

    def __init__(self, path):
        try:
            if str(path).lower().endswith(".npy"):
                arrays = {"X": np.load(path, mmap_mode="r")}
            else:
                arrays = _npz_arrays(path)
        except FileNotFoundError:
            raise UsageError(f"data file not found: {path}") from None
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise UsageError(f"cannot read {path} as NumPy data: {e}") from None
        super().__init__(str(path), {
            name: Rows(name, a.shape[0] if a.ndim else 0, a.shape[1:], a.dtype,
                       lambda lo, hi, a=a: np.asarray(a[lo:hi]))
            for name, a in arrays.items() if a.ndim >= 1})


def _npz_arrays(path):
    """{name: array} of a .npz: a stored member as a memory map of its bytes in the zip file,
    a compressed one read whole (its bytes are not addressable)."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with zf.open(info) as member:
                    out[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            fh.seek(info.header_offset)
            local = fh.read(30)  # the local header: its name and extra field lengths at 26..29
            skip = int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
            fh.seek(info.header_offset + 30 + skip)
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            if dtype.hasobject:
                raise ValueError(f"{name} holds Python objects")
            out[name] = np.memmap(path, dtype, "r", fh.tell(), shape,
                                  "F" if fortran else "C")
    return out


class ParquetTable(_Container):
    """Parquet file(s) as datasets: each column by its name, X every other column."""

    def __init__(self, files, not_features):
        import pyarrow.parquet as pq
        self.parts = []
        for path in files:
            try:
                self.parts.append(pq.ParquetFile(path))
            except FileNotFoundError:
                raise UsageError(f"data file not found: {path}") from None
            except Exception as e:  # noqa: BLE001 - pyarrow's errors name no common base
                raise UsageError(f"cannot read {path} as Parquet: {e}") from None
        first = self.parts[0].schema_arrow
        for path, part in zip(files, self.parts):
            if not part.schema_arrow.equals(first):
                raise UsageError(f"{path} has columns {part.schema_arrow.names}; {files[0]} has "
                                 f"{first.names}: all data files must hold the same columns")
        self.files = list(files)
        self.groups = [(p, g, p.metadata.row_group(g).num_rows) for p in self.parts
                       for g in range(p.metadata.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum([n for *_, n in self.groups])])
        self.cache = {}
        n = int(self.starts[-1])
        datasets = {}
        for field in first:
            datasets[field.name] = self._column(field, n)
        features = [f for f in first if f.name not in not_features]
        self.text = [f.name for f in features if not _numeric(f.type)]
        if not features:
            raise UsageError(f"{files[0]} has no input columns (only {', '.join(first.names)})")
        if not self.text:
            datasets["X"] = Rows("X", n, (len(features),),
                                 np.result_type(*[f.type.to_pandas_dtype() for f in features]),
                                 lambda a, b, names=[f.name for f in features]:
                                 np.column_stack([self._values(c, a, b) for c in names]))
        super().__init__(files[0] if len(files) == 1 else ",".join(files), datasets)

    def __getitem__(self, key):
        if key == "X" and self.text:  # asked for only when the inputs are read
            raise UsageError(f"{self.files[0]}: column {self.text[0]!r} holds text; the inputs "
                             "(every column but the label and weight columns) must be numbers")
        return super().__getitem__(key)

    def __contains__(self, key):
        return key == "X" or super().__contains__(key)

    def _column(self, field, n):
        if _numeric(field.type):
            return Rows(field.name, n, (), field.type.to_pandas_dtype(),
                        lambda a, b, name=field.name: self._values(name, a, b))
        return TextLabels(field.name, n, self)

    def _values(self, name, a, b, text=False):
        """Rows a..b of one column, read a row group at a time (the last one kept)."""
        pieces = []
        first = int(np.searchsorted(self.starts, a, side="right")) - 1
        g = max(first, 0)
        while g < len(self.groups) and self.starts[g] < b:
            lo, hi = max(a, self.starts[g]) - self.starts[g], min(b, self.starts[g + 1]) - \
                self.starts[g]
            pieces.append(self._group(g, name, text)[int(lo):int(hi)])
            g += 1
        if not pieces:
            return np.empty(0, object if text else np.float64)
        return np.concatenate(pieces)

    def _group(self, g, name, text):
        key = (g, name)
        if key not in self.cache:
            part, index, _ = self.groups[g]
            column = part.read_row_group(index, columns=[name]).column(0)
            values = (np.array(column.to_pylist(), object) if text
                      else column.to_numpy(zero_copy_only=False))
            self.cache = {k: v for k, v in self.cache.items() if k[0] == g}  # one group kept
            self.cache[key] = values
        return self.cache[key]


def _numeric(arrow_type):
    import pyarrow as pa
    return (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
            or pa.types.is_boolean(arrow_type))
