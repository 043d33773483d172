"""`mpinn data synth` and `mpinn data inspect` on real files they write and read."""
import json

import h5py
import numpy as np
import pytest

from helpers import ok, run_mpinn
from mpinn.cli import main


def synth(tmp_path, name, *args):
    path = tmp_path / name
    assert main(["data", "synth", "--out", str(path), *map(str, args)]) == 0
    with h5py.File(path, "r") as f:
        return path, f["X"][...], f["y"][...], f["X"].chunks, f["X"].compression


def test_synth_rows_do_not_depend_on_chunking(tmp_path):
    # 70,000 rows cross the 65,536-row generator block; chunk sizes that do and don't align
    base = synth(tmp_path, "a.h5", "--rows", 70000, "--features", 8, "--chunk-rows", 70000)
    for i, chunk in enumerate((1000, 65536, 3333)):
        other = synth(tmp_path, f"b{i}.h5", "--rows", 70000, "--features", 8, "--chunk-rows",
                      chunk, "--compression", "gzip" if i == 0 else "none")
        np.testing.assert_array_equal(other[1], base[1])
        np.testing.assert_array_equal(other[2], base[2])
        assert other[3] == (min(chunk, 70000), 8)
    assert synth(tmp_path, "g.h5", "--rows", 100, "--compression", "gzip")[4] == "gzip"
    seed1 = synth(tmp_path, "s.h5", "--rows", 70000, "--features", 8, "--seed", 1)
    assert not np.array_equal(seed1[1], base[1])
    counts = np.bincount(base[2], minlength=10)
    assert (counts > 0).all() and base[1].dtype == np.float32 and base[2].dtype == np.int64


def test_synth_data_is_learnable(tmp_path):
    path = synth(tmp_path, "d.h5", "--rows", 6000, "--features", 16, "--classes", 4)[0]
    ok(run_mpinn(2, "train", "--data", path, "--val-data", path, "--epochs", 8,
                 "--batch-size", 128, "--run-dir", tmp_path / "run", "--log-every", 1000))
    epochs = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    accuracy = [e["val_accuracy"] for e in epochs if e["kind"] == "epoch"][-1]
    assert accuracy > 0.8, accuracy


def test_inspect_reports_shapes_ranges_nan_and_classes(tmp_path, capsys):
    x = np.arange(30, dtype=np.float64).reshape(10, 3)
    x[2, 1], x[5, 0] = np.nan, np.inf
    y = np.array([0, 1, 1, 2, 2, 2, 0, 1, 2, 2])
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("X", data=x, chunks=(4, 3), compression="gzip")
        f["y"] = y
        f["group/extra"] = np.array([b"a", b"b"])
    assert main(["data", "inspect", str(tmp_path / "f.h5"), "--json", "--chunk-rows", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    X, Y = report["datasets"]["X"], report["datasets"]["y"]
    finite = x[np.isfinite(x)]
    assert X["shape"] == [10, 3] and X["dtype"] == "float64" and X["chunks"] == [4, 3]
    assert X["compression"] == "gzip" and X["nan"] == 1 and X["inf"] == 1
    assert (X["min"], X["max"]) == (finite.min(), finite.max())
    assert X["mean"] == pytest.approx(finite.mean())
    assert Y["class_counts"] == {"0": 2, "1": 3, "2": 5} and Y["chunks"] is None
    assert report["datasets"]["group/extra"]["dtype"] == "|S1"
    assert main(["data", "inspect", str(tmp_path / "f.h5")]) == 0
    text = capsys.readouterr().out
    assert "classes: 0: 2 (20.0%), 1: 3 (30.0%), 2: 5 (50.0%)" in text and "1 NaN, 1 inf" in text


@pytest.mark.parametrize("argv,message", [
    (["data", "inspect", "{tmp}/missing.h5"], "data file not found"),
    (["data", "synth", "--out", "{tmp}/nowhere/s.h5"], "does not exist"),
    (["data", "synth", "--rows", "0"], "--rows must be positive"),
    (["data", "synth", "--classes", "1"], "--classes must be at least 2"),
    (["data", "synth", "--compression", "zstd"], "invalid choice"),
    (["data"], "required"),
])
def test_data_tool_errors(tmp_path, capsys, argv, message):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("mpinn: error")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
