"""Data files: opening one (or several, joined by an HDF5 virtual file, nothing copied), naming
them (globs, comma lists, absolute paths) and fingerprinting them for --resume."""
import atexit
import functools
import glob
import json
import os
import shutil
import tempfile
import zlib

import h5py
import numpy as np

from ..errors import UsageError
from .tables import is_table, open_table


CONVERTIBLE = (".csv", ".csv.gz", ".txt", ".tsv", ".idx", "-ubyte", "-ubyte.gz")  # data convert's


def not_hdf5(path, error):
    """The message for a data file HDF5 cannot open: what mpinn reads, and (a CSV or MNIST IDX
    file) the command that converts it."""
    hint = "mpinn trains on HDF5, Parquet (.parquet) and NumPy (.npz, .npy) files"
    if str(path).lower().endswith(CONVERTIBLE):
        stem = os.path.basename(str(path)).split(".")[0] or "data"
        hint += (f"; convert this one first: mpinn data convert {path} --out {stem}.h5 "
                 "(--label-column NAME names the targets' column; docs/usage.md)")
    return f"cannot open {path} as HDF5 ({error}): {hint}"


def open_h5(spec, cols=None):
    """Open a data file read-only with file locking off (locks fail on many shared filesystems and
    are not needed for readers). `spec` is one path, or several (comma-separated paths and/or
    quoted glob patterns): then one virtual file that concatenates their rows (data_files).
    Parquet and NumPy files open as look-alikes (tables.py); cols (read.Columns) names the label
    and weight columns a table's inputs X leave out."""
    files = data_files(spec)
    if any(is_table(p) for p in files):
        skip = (cols.y_key, cols.w_key) if cols is not None else ("y",)
        return open_table(files, tuple(k for k in skip if k))
    path = files[0] if len(files) == 1 else virtual_file(tuple(files))
    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise UsageError(f"data file not found: {path}") from None
    except OSError as e:
        raise UsageError(not_hdf5(path, e)) from None


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
        raise UsageError(not_hdf5(path, e)) from None
    with f:
        out = {}
        for name, ds in f.items():
            if isinstance(ds, h5py.Dataset) and ds.ndim >= 1:
                attrs = tuple(sorted((k, json.dumps(plain_value(v))) for k, v in ds.attrs.items()))
                out[name] = (ds.shape[0], tuple(ds.shape[1:]), str(ds.dtype), attrs)
        rows = {r for r, *_ in out.values()}
        if len(rows) > 1:
            raise UsageError(f"{path}: its datasets have different row counts "
                             f"({', '.join(f'{k} {v[0]}' for k, v in out.items())})")
        return out


def plain_value(value):
    """An attribute value as JSON-able Python (str for bytes), to compare files and copy it."""
    if isinstance(value, np.ndarray):
        return [plain_value(v) for v in value.tolist()]
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value
