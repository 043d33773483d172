"""Parquet and NumPy inputs (data/tables.py): read through the HDF5 readers' own calls, so a run on
a .parquet file (or a glob of them, or an .npz) is the run on the HDF5 file of the same rows, in
memory or streamed, at any rank count; evaluate and predict read them too; a table's label and
weight columns are left out of its inputs; text labels become named classes; and bad tables are
one clear error each."""
import json

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import ok, run_many, run_mpinn
from mpinn import checkpoint
from mpinn.data import Columns, open_h5, plan_selections, read_rows
from mpinn.data.tables import NumpyArrays, Rows
from mpinn.plan import BatchPlan

N, F = 157, 4


def table():
    rng = np.random.default_rng(21)
    x = rng.normal(size=(N, F)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)
    w = rng.uniform(0.5, 2, N).astype(np.float32)
    return x, y, w


def write_parquet(path, x, y, w, labels=None, rows_per_group=20):
    cols = {f"f{i}": x[:, i] for i in range(x.shape[1])}
    cols["target"] = y if labels is None else np.asarray(labels)[y]
    cols["weight"] = w
    pq.write_table(pa.table(cols), path, row_group_size=rows_per_group)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tables")
    x, y, w = table()
    with h5py.File(tmp / "d.h5", "w") as f:
        f["X"], f["target"], f["weight"] = x, y, w
    write_parquet(tmp / "d.parquet", x, y, w)
    for i, (a, b) in enumerate([(0, 70), (70, N)]):  # two files, rows split across them
        write_parquet(tmp / f"part-{i}.parquet", x[a:b], y[a:b], w[a:b], rows_per_group=16)
    np.savez(tmp / "d.npz", X=x, target=y, weight=w)
    np.savez_compressed(tmp / "c.npz", X=x, target=y, weight=w)
    return tmp, x, y, w


# -- reading, without MPI -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["d.parquet", "part-*.parquet", "d.npz", "c.npz"])
@pytest.mark.parametrize("rank,size", [(0, 1), (1, 3), (2, 4)])
def test_a_ranks_rows_read_from_a_table_are_the_hdf5_files(files, name, rank, size):
    tmp, x, y, _ = files
    cols = Columns("X", "target", w_key="weight")
    plan = BatchPlan(N, 24, rank, size)
    got_x, got_y = read_rows(str(tmp / name), cols, plan_selections(plan), None)
    np.testing.assert_array_equal(got_x, x[plan.owned_rows()])
    np.testing.assert_array_equal(got_y, y[plan.owned_rows()])
    with open_h5(str(tmp / name), cols) as f:
        assert f["X"].shape == (N, F) and {"X", "target", "weight"} <= set(f.keys())
        order = np.sort(np.random.default_rng(size).choice(N, 30, replace=False))
        np.testing.assert_array_equal(f["X"][order], x[order])


def test_stored_npz_members_are_memory_mapped(files):
    tmp = files[0]
    stored, compressed = NumpyArrays(str(tmp / "d.npz")), NumpyArrays(str(tmp / "c.npz"))
    assert isinstance(stored["X"], Rows) and stored["X"].shape == (N, F)
    from mpinn.data import tables
    assert all(isinstance(a, np.memmap) for a in tables._npz_arrays(str(tmp / "d.npz")).values())
    assert not any(isinstance(a, np.memmap)
                   for a in tables._npz_arrays(str(tmp / "c.npz")).values())
    np.testing.assert_array_equal(stored["X"][5:9], compressed["X"][5:9])


def test_text_labels_become_named_classes_in_sorted_order(tmp_path):
    x, y, w = table()
    write_parquet(tmp_path / "t.parquet", x, y, w, labels=["cat", "ant", "bee"])
    with open_h5(str(tmp_path / "t.parquet"), Columns("X", "target", w_key="weight")) as f:
        assert list(f["target"].attrs["classes"]) == ["ant", "bee", "cat"]
        np.testing.assert_array_equal(f["target"][0:N], np.array([2, 0, 1])[y])
        assert f["X"].shape == (N, F)  # the label and weight columns are not inputs


# -- training, evaluating and predicting on tables ------------------------------------------------
@pytest.fixture(scope="module")
def runs(files):
    tmp = files[0]
    common = ["--y-key", "target", "--weight-key", "weight", "--hidden", 8, "--epochs", 2,
              "--batch-size", 24, "--shuffle", "global", "--val-fraction", 0.2]
    jobs = {}
    for name, data, ranks, extra in (
            ("h5", "d.h5", 2, []), ("parquet", "d.parquet", 2, []),
            ("glob", "part-*.parquet", 3, []), ("npz", "d.npz", 2, []),
            ("streamed", "d.parquet", 2, ["--memory-budget", 0.0004])):
        jobs[name] = (ranks, ["train", "--data", tmp / data, *common, *extra,
                              "--run-dir", tmp / name])
    out = run_many(jobs, tmp / "jobs")
    for r in out.values():
        ok(r)
    return tmp, out


def test_training_on_a_table_is_training_on_the_hdf5_file(runs):
    tmp, out = runs
    h5 = checkpoint.load(str(tmp / "h5" / "checkpoint.h5")).params
    for name in ("parquet", "npz", "streamed"):
        np.testing.assert_array_equal(checkpoint.load(str(tmp / name / "checkpoint.h5")).params,
                                      h5, err_msg=name)
    np.testing.assert_allclose(checkpoint.load(str(tmp / "glob" / "checkpoint.h5")).params, h5,
                               rtol=0, atol=1e-6)  # 3 ranks: sums in another order only
    assert "streamed from" in out["streamed"].stdout


def test_evaluate_and_predict_read_tables(runs):
    tmp = runs[0]
    ckpt = tmp / "parquet" / "checkpoint.h5"
    results = [json.loads(ok(run_mpinn(2, "evaluate", "--checkpoint",
                                       tmp / run / "checkpoint.h5", "--data", tmp / data,
                                       "--y-key", "target", "--json")).stdout)
               for run, data in (("parquet", "d.parquet"), ("h5", "d.h5"))]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-12)
    assert results[0]["part"] == results[1]["part"] == "validation"  # each run's own split
    ok(run_mpinn(2, "predict", "--checkpoint", ckpt, "--data", tmp / "part-*.parquet", "--out",
                 tmp / "p.h5"))
    ok(run_mpinn(1, "predict", "--checkpoint", ckpt, "--data", tmp / "d.h5", "--out",
                 tmp / "q.h5"))
    with h5py.File(tmp / "p.h5") as p, h5py.File(tmp / "q.h5") as q:
        np.testing.assert_allclose(p["prob"][...], q["prob"][...], rtol=1e-6, atol=1e-7)


BAD = {
    "no label column": "no dataset 'target' for targets",
    "text feature": "column 'f1' holds text",
    "other columns": "must hold the same columns",
    "npy for training": "no dataset 'target' for targets",
    "not parquet": "cannot read",
}


@pytest.fixture(scope="module")
def bad_runs(files, tmp_path_factory):
    """Every bad table trained at 2 ranks, in one launch (tests/many.py)."""
    _, x, y, w = files
    tmp = tmp_path_factory.mktemp("bad")
    jobs = {}
    for i, case in enumerate(BAD):
        folder = tmp / f"case-{i}"
        folder.mkdir()
        data = folder / "bad.parquet"
        if case == "no label column":
            pq.write_table(pa.table({"f0": x[:, 0], "weight": w}), data)
        elif case == "text feature":
            pq.write_table(pa.table({"f0": x[:, 0], "f1": np.array(["a", "b"])[y % 2],
                                     "target": y, "weight": w}), data)
        elif case == "other columns":
            write_parquet(folder / "a.parquet", x, y, w)
            pq.write_table(pa.table({"g0": x[:, 0], "target": y, "weight": w}),
                           folder / "b.parquet")
            data = folder / "*.parquet"
        elif case == "npy for training":
            data = folder / "x.npy"
            np.save(data, x)
        else:
            data.write_text("not a table")
        jobs[case] = (2, ["train", "--data", data, "--y-key", "target", "--weight-key",
                          "weight", "--run-dir", folder / "run"])
    return tmp, run_many(jobs, tmp / "jobs")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tables_are_one_clear_error(bad_runs, case):
    tmp, out = bad_runs
    assert out[case].returncode == 2 and BAD[case] in out[case].stderr, out[case].stderr
    assert not any(tmp.glob("case-*/run/checkpoint.h5"))


def test_rows_spread_over_a_file_are_read_in_bounded_spans():
    """A rank's training rows are its block of every batch, spread over the whole file: they are
    read a bounded stretch at a time, never the whole file at once (Parquet, NumPy, a split)."""
    from mpinn.data.read import read_rows_at
    from mpinn.data.tables import SPAN_ROWS
    n = 100_000
    data = np.arange(2 * n).reshape(n, 2)
    reads = []

    def read(a, b):
        reads.append(b - a)
        return data[a:b]
    rows = Rows("X", n, (2,), data.dtype, read)
    sel = h5py.MultiBlockSlice(start=0, stride=64, count=n // 64, block=32)
    idx = (np.arange(n // 64)[:, None] * 64 + np.arange(32)).reshape(-1)
    out = np.empty((len(idx), 2), data.dtype)
    rows.read_direct(out, sel)
    assert np.array_equal(out, data[idx]) and 0 < max(reads) <= SPAN_ROWS
    reads.clear()
    got = read_rows_at(rows, idx, np.empty_like(out))  # a split's rows, through a dataset
    assert np.array_equal(got, data[idx]) and 0 < max(reads) <= SPAN_ROWS
