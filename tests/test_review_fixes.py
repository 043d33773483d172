"""Defects found by the code review and the fault cases of issue 26, one section per item: each test
failed on the code before its fix."""
import os

import h5py
import numpy as np
import pytest

from mpinn.data import RowSource


# --- 1. streaming reads across stored chunk boundaries ---------------------------------------------

def _write_chunked(path, x, chunk_rows, reverse):
    """x in chunks of chunk_rows rows, written in file order or last chunk first (the chunks then
    lie in the file in reverse order, with HDF5's B-tree nodes between them past 64 chunks)."""
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("X", shape=x.shape, dtype=x.dtype, chunks=(chunk_rows, x.shape[1]))
        starts = range(0, len(x), chunk_rows)
        for a in (reversed(starts) if reverse else starts):
            ds[a:a + chunk_rows] = x[a:a + chunk_rows]


@pytest.mark.parametrize("reverse", [False, True])
def test_row_source_reads_across_many_chunks(tmp_path, reverse):
    """> 64 chunks: runs of rows must be cut where a stored chunk ends (the next chunk is elsewhere
    in the file)."""
    x = np.random.default_rng(5).normal(size=(150 * 16, 4)).astype(np.float32)
    path = str(tmp_path / "x.h5")
    _write_chunked(path, x, 16, reverse)
    source = RowSource(path, "X")
    assert source.layout is not None  # the direct-read path, not HDF5's
    offsets = source.layout[1]
    assert any(b - a != 16 * 4 * 4 for a, b in zip(offsets, offsets[1:]))  # chunks not back to back
    rng = np.random.default_rng(6)
    try:
        for rows in (np.arange(len(x)), np.arange(10, 2000), rng.permutation(len(x))[:900],
                     np.array([15, 16, 17, 31, 32, 2399, 0])):
            np.testing.assert_array_equal(source.read(rows), x[rows])
    finally:
        source.close()


# --- 2. reads over 2 GiB: preadv returns part of a request -------------------------------------------

def test_row_source_reads_on_after_a_partial_read(tmp_path, monkeypatch):
    """Linux returns at most 2,147,479,552 bytes from one preadv (and any read may come back short):
    a read goes on where the last one stopped. Here every call returns at most 1000 bytes."""
    import mpinn.data
    x = np.random.default_rng(7).normal(size=(3000, 9)).astype(np.float32)
    path = str(tmp_path / "x.h5")
    with h5py.File(path, "w") as f:
        f["X"] = x
    real, calls = os.preadv, []

    def capped(fd, buffers, offset):
        (buf,) = buffers
        calls.append(len(memoryview(buf).cast("B")))
        return real(fd, [memoryview(buf).cast("B")[:1000]], offset)
    monkeypatch.setattr(mpinn.data.os, "preadv", capped)
    source = RowSource(path, "X")
    try:
        np.testing.assert_array_equal(source.read(np.arange(100, 2900)), x[100:2900])
    finally:
        source.close()
    assert len(calls) > 100  # read in many parts


def test_row_source_says_short_read_at_end_of_file(tmp_path, monkeypatch):
    import mpinn.data
    from mpinn.errors import UsageError
    path = str(tmp_path / "x.h5")
    with h5py.File(path, "w") as f:
        f["X"] = np.ones((100, 3), np.float32)
    monkeypatch.setattr(mpinn.data.os, "preadv", lambda fd, buffers, offset: 0)
    source = RowSource(path, "X")
    try:
        with pytest.raises(UsageError, match="short read"):
            source.read(np.arange(10))
    finally:
        source.close()
