"""Checkpoint files: round trip, atomic replacement, refusal of foreign or newer files."""
import os

import h5py
import numpy as np
import pytest

from mpinn import checkpoint
from mpinn.checkpoint import Checkpoint
from mpinn.errors import UsageError
from mpinn.model import Architecture, init_params, layer_views


def sample():
    arch = Architecture((4, 5, 3), "tanh", "identity", "cross_entropy")
    p = init_params(arch, 1)
    return Checkpoint(arch, p, "adam", 7, [p * 2, p * 3], 2, 40, 9, {"lr": 0.1, "ranks": 2})


def test_round_trip(tmp_path):
    path = str(tmp_path / "c.h5")
    c = sample()
    checkpoint.save(path, c)
    d = checkpoint.load(path)
    assert d.arch == c.arch
    np.testing.assert_array_equal(d.params, c.params)
    assert len(d.optimizer_state) == 2
    np.testing.assert_array_equal(d.optimizer_state[1], c.optimizer_state[1])
    assert (d.optimizer, d.optimizer_step, d.epoch, d.global_step, d.seed) == ("adam", 7, 2, 40, 9)
    assert d.config == c.config
    with h5py.File(path, "r") as f:  # per-layer layout, readable without mpinn
        W1, b1 = layer_views(c.arch, c.params)[1]
        np.testing.assert_array_equal(f["params/W1"][...], W1)
        np.testing.assert_array_equal(f["params/b1"][...], b1)
        assert f.attrs["format_version"] == checkpoint.FORMAT_VERSION
    assert os.listdir(tmp_path) == ["c.h5"]  # no temporary left behind


def test_meta_round_trip_rebuilds_shapes():
    c = sample()
    d = Checkpoint.from_meta(c.meta())
    assert d.arch == c.arch and d.params.shape == c.params.shape
    assert len(d.optimizer_state) == 2 and d.config == c.config


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.h5")
    checkpoint.save(path, sample())
    before = open(path, "rb").read()
    monkeypatch.setattr(checkpoint, "_fsync_path", lambda p: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        checkpoint.save(path, sample())
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.h5"]


def test_refuses_missing_foreign_and_newer(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        checkpoint.load(str(tmp_path / "none.h5"))
    text = tmp_path / "t.h5"
    text.write_text("not hdf5")
    with pytest.raises(UsageError, match="not a readable HDF5"):
        checkpoint.load(str(text))
    foreign = str(tmp_path / "f.h5")
    with h5py.File(foreign, "w") as f:
        f["X"] = np.zeros(3)
    with pytest.raises(UsageError, match="not an mpinn checkpoint"):
        checkpoint.load(foreign)
    newer = str(tmp_path / "n.h5")
    checkpoint.save(newer, sample())
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = checkpoint.FORMAT_VERSION + 1
    with pytest.raises(UsageError, match="upgrade mpinn"):
        checkpoint.load(newer)
