"""Data in many files: --data takes comma-separated paths and quoted glob patterns; rows are the
files' concatenation in sorted path order (a rank's rows may span two files), and training,
evaluation and prediction give exactly what one concatenated file gives. Files that disagree are
refused with the file named."""
import json

import h5py
import numpy as np
import pytest

from helpers import ok, run_many, run_mpinn
from mpinn import checkpoint
from mpinn.data import data_files, open_h5
from mpinn.errors import UsageError


def split_files(tmp_path, cuts=(0, 333, 700, 1000), features=8, classes=3, names=True):
    """all.h5 and its rows cut into part-0.h5, part-1.h5, ... (same datasets and class names)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(cuts[-1], features)).astype(np.float32)
    y = (x @ rng.normal(size=(features, classes))).argmax(1).astype(np.int64)

    def write(path, a, b):
        with h5py.File(path, "w") as f:
            f["X"], f["y"] = x[a:b], y[a:b]
            if names:
                f["y"].attrs["classes"] = np.array([f"c{i}" for i in range(classes)], dtype=object)
    write(tmp_path / "all.h5", 0, cuts[-1])
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        write(tmp_path / f"part-{i}.h5", a, b)
    return x, y


def test_a_spec_names_files_in_sorted_path_order(tmp_path):
    split_files(tmp_path)
    p = [str(tmp_path / f"part-{i}.h5") for i in range(3)]
    assert data_files(p[0]) == [p[0]]
    assert data_files(f"{p[2]},{p[0]}, {p[1]}") == p
    assert data_files(str(tmp_path / "part-*.h5")) == p
    assert data_files(f"{tmp_path}/part-[12].h5,{p[0]}") == p
    with pytest.raises(UsageError, match="matches no file"):
        data_files(str(tmp_path / "nothing-*.h5"))


def test_the_virtual_file_is_the_concatenation(tmp_path):
    x, y = split_files(tmp_path, cuts=(0, 1, 500, 999, 1000))
    with open_h5(str(tmp_path / "part-*.h5")) as f:
        np.testing.assert_array_equal(f["X"][:], x)
        np.testing.assert_array_equal(f["y"][:], y)
        np.testing.assert_array_equal(f["X"][998:1000], x[998:1000])  # across a file boundary
        assert list(f["y"].attrs["classes"]) == ["c0", "c1", "c2"]


@pytest.mark.parametrize("case,message", [
    ("features", "part-1.h5:X differs from .*part-0.h5:X in row shape"),
    ("label dtype", "part-1.h5:y differs from .*part-0.h5:y in dtype"),
    ("class names", "part-1.h5:y differs from .*part-0.h5:y in attributes"),
    ("datasets", "part-1.h5 has datasets .*all data files must hold the same datasets"),
    ("rows", "part-1.h5: its datasets have different row counts"),
])
def test_files_that_disagree_are_refused_naming_the_file(tmp_path, case, message):
    split_files(tmp_path)
    x, y = np.zeros((5, 8), np.float32), np.zeros(5, np.int64)
    names = np.array(["c0", "c1", "c2"], dtype=object)
    if case == "features":
        x = np.zeros((5, 9), np.float32)
    elif case == "label dtype":
        y = np.zeros(5, np.float32)
    elif case == "class names":
        names = np.array(["a", "b", "c"], dtype=object)
    elif case == "rows":
        y = np.zeros(4, np.int64)
    with h5py.File(tmp_path / "part-1.h5", "w") as f:
        f["X"], f["y"] = x, y
        f["y"].attrs["classes"] = names
        if case == "datasets":
            f["extra"] = np.zeros(5)
    with pytest.raises(UsageError, match=message):
        open_h5(str(tmp_path / "part-*.h5"))


def test_training_on_many_files_equals_one_concatenated_file(tmp_path):
    """3 ranks over 3 files whose boundaries fall inside ranks' slices; global shuffle (rows move
    between ranks) and a pipeline (only the first stage reads inputs, the last targets)."""
    split_files(tmp_path)
    parts = str(tmp_path / "part-*.h5")
    for name, extra in (("global", ["--shuffle", "global"]), ("pipe", ["--pipeline-stages", "3"])):
        ok(run_mpinn(3, "train", "--data", tmp_path / "all.h5", "--epochs", 2, "--hidden", "16,8",
                     "--run-dir", tmp_path / f"one-{name}", *extra))
        ok(run_mpinn(3, "train", "--data", parts, "--val-data", f"{tmp_path}/part-0.h5,"
                     f"{tmp_path}/part-2.h5", "--epochs", 2, "--hidden", "16,8",
                     "--run-dir", tmp_path / f"many-{name}", *extra))
        a = checkpoint.load(str(tmp_path / f"one-{name}" / "checkpoint.h5"))
        b = checkpoint.load(str(tmp_path / f"many-{name}" / "checkpoint.h5"))
        np.testing.assert_array_equal(a.params, b.params)
    # the checkpoint records the expanded list: a resumed run reads those files, not the pattern's
    assert b.config["data"] == ",".join(str(tmp_path / f"part-{i}.h5") for i in range(3))
    (tmp_path / "part-3.h5").write_bytes((tmp_path / "part-0.h5").read_bytes())
    r = ok(run_mpinn(3, "train", "--run-dir", tmp_path / "many-global", "--resume", "--epochs", 3))
    assert "1000 rows" in r.stdout
    # evaluate and predict over the files give what one file gives
    ckpt = tmp_path / "one-global" / "checkpoint.h5"
    one = ok(
        run_mpinn(2, "evaluate", "--checkpoint", ckpt, "--data", tmp_path / "all.h5", "--json")
    )
    many = ok(run_mpinn(2, "evaluate", "--checkpoint", ckpt, "--data",
                        ",".join(str(tmp_path / f"part-{i}.h5") for i in range(3)), "--json"))
    a, b = json.loads(one.stdout), json.loads(many.stdout)
    assert {k: v for k, v in a.items() if k != "data"} == {
        k: v for k, v in b.items() if k != "data"
    }
    assert a["loss"] > 0 and 0 < a["accuracy"] <= 1
    ok(run_mpinn(1, "predict", "--checkpoint", ckpt, "--data", parts, "--out", tmp_path / "p.h5"))
    with h5py.File(tmp_path / "p.h5") as f:
        assert f["pred"].shape == (1333,)  # the pattern matches part-3.h5 too by now


# --- streaming: inputs larger than --memory-budget are read as training goes --------------------

def test_read_file_rows_in_any_order(tmp_path):
    from mpinn.data import read_file_rows
    x = np.arange(300, dtype=np.float64).reshape(100, 3)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["X"] = x
    rng = np.random.default_rng(1)
    with h5py.File(tmp_path / "x.h5") as f:
        for rows in (
            np.arange(10, 60),
            rng.permutation(100)[:37],
            np.concatenate([np.arange(5, 15), np.arange(40, 47), [99, 0]]),
            np.array([], int),
        ):
            got = read_file_rows(f["X"], rows)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, x[rows].astype(np.float32))


STREAMED = [
    (1, "rank", []), (2, "none", []), (2, "rank", ["--dropout", "0.3"]), (2, "global", []),
    (3, "global", ["--steps", 40]),  # ends inside an epoch: the read-ahead thread is stopped
]


@pytest.fixture(scope="module")
def from_memory_and_streamed(tmp_path_factory):
    """(ranks, shuffle, extra, "memory" | "streamed") -> (run, run folder). The trainings of one
    rank count run in one launch (helpers.run_many), which also fails a run that leaves its
    read-ahead thread running."""
    root = tmp_path_factory.mktemp("streamed")
    split_files(root)
    jobs = {}
    for ranks, shuffle, extra in STREAMED:
        common = ["--data", root / "all.h5", "--epochs", 3, "--shuffle", shuffle, *extra]
        name = f"{ranks}-{shuffle}-{len(extra)}"
        key = (ranks, shuffle, tuple(extra))
        jobs[key + ("memory",)] = (ranks, ["train", *common, "--run-dir", root / f"{name}-memory"])
        # 8 KiB: smaller than any slice here (334-1000 rows x 32 B); chunks of 87 rows, several
        # an epoch
        jobs[key + ("streamed",)] = (ranks, ["train", *common, "--memory-budget", 0.008,
                                             "--run-dir", root / f"{name}-streamed"])
    runs = run_many(jobs, root)
    return {key: (ok(runs[key]), argv[-1]) for key, (_, argv) in jobs.items()}


@pytest.mark.parametrize("ranks,shuffle,extra", STREAMED)
def test_streamed_training_equals_training_from_memory(from_memory_and_streamed, ranks, shuffle,
                                                       extra):
    key = (ranks, shuffle, tuple(extra))
    (_, memory), (r, streamed) = (from_memory_and_streamed[key + (how,)]
                                  for how in ("memory", "streamed"))
    assert "inputs streamed from" in r.stdout and "chunks of 87 rows" in r.stdout
    a = checkpoint.load(str(memory / "checkpoint.h5"))
    b = checkpoint.load(str(streamed / "checkpoint.h5"))
    assert a.global_step == b.global_step
    np.testing.assert_array_equal(a.params, b.params)


def test_streaming_is_refused_in_pipeline_mode_with_the_reason(tmp_path):
    split_files(tmp_path)
    r = run_mpinn(2, "train", "--data", tmp_path / "all.h5", "--pipeline-stages", 2,
                  "--memory-budget", 0.01, "--run-dir", tmp_path / "r")
    assert r.returncode == 2 and "streaming is data parallel only" in r.stderr


@pytest.mark.parametrize("layout", ["contiguous", "chunked", "chunked-odd", "gzip", "float64"])
def test_row_source_reads_any_rows_of_any_layout(tmp_path, layout):
    """Direct reads (pread of runs) where the data are stored plainly; HDF5 for the rest."""
    from mpinn.data import RowSource
    x = np.random.default_rng(3).normal(size=(1000, 7))
    opts = {"contiguous": {}, "chunked": {"chunks": (100, 7)}, "chunked-odd": {"chunks": (64, 7)},
            "gzip": {"chunks": (100, 7), "compression": "gzip"}, "float64": {}}[layout]
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("X", data=x if layout == "float64" else x.astype(np.float32), **opts)
    source = RowSource(str(tmp_path / "x.h5"), "X")
    assert (source.layout is None) == (layout == "gzip")
    rng = np.random.default_rng(4)
    try:
        for rows in (
            rng.permutation(1000)[:333],
            np.arange(50, 950),
            np.array([999, 0, 63, 64, 65]),
            np.concatenate([np.arange(90, 130), rng.permutation(1000)[:20] + 0]),
        ):
            rows = np.unique(rows) if len(np.unique(rows)) != len(rows) else rows
            got = source.read(rows)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, x[rows].astype(np.float32))
    finally:
        source.close()
