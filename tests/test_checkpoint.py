"""Checkpoint files: round trip, atomic replacement, refusal of foreign or newer files."""
import os

import h5py
import numpy as np
import pytest

from mpinn import checkpoint
from mpinn.checkpoint import Checkpoint
from mpinn.errors import RunError, UsageError
from mpinn.model import Architecture, init_params, layer_views


def sample():
    arch = Architecture((4, 5, 3), "tanh", "identity", "cross_entropy")
    p = init_params(arch, 1)
    return Checkpoint(arch, p, "adam", 7, [p * 2, p * 3], 2, 40, 9, {"lr": 0.1, "ranks": 2})


def test_a_float64_network_round_trips_in_float64(tmp_path):
    """--dtype float64: weights and optimizer state stored and read back as float64, bit for
    bit, with the dtype among the attributes the checksum covers; a float32 file carries no
    dtype attribute (an older mpinn's files read as float32)."""
    import dataclasses
    c = sample()
    arch = dataclasses.replace(c.arch, dtype="float64")
    p = init_params(arch, 1) + 1e-12  # a value float32 cannot hold
    c64 = dataclasses.replace(c, arch=arch, params=p, optimizer_state=[p / 3, p * 1e-300])
    checkpoint.save(str(tmp_path / "c64.h5"), c64)
    d = checkpoint.load(str(tmp_path / "c64.h5"))
    assert d.arch == arch and d.params.dtype == d.optimizer_state[0].dtype == np.float64
    np.testing.assert_array_equal(d.params, p)
    np.testing.assert_array_equal(d.optimizer_state[1], p * 1e-300)
    checkpoint.save(str(tmp_path / "c32.h5"), c)
    with h5py.File(tmp_path / "c32.h5", "r") as f:
        assert "dtype" not in f.attrs
    with h5py.File(tmp_path / "c64.h5", "r+") as f:  # a dtype edited by hand: refused
        f.attrs["dtype"] = "float32"
    with pytest.raises(UsageError, match="fails its checksum"):
        checkpoint.load(str(tmp_path / "c64.h5"))


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
        # without a scaling, format 1 (an older mpinn reads it); test_scaling.py: format 2
        assert f.attrs["format_version"] == 1 < checkpoint.FORMAT_VERSION
    assert os.listdir(tmp_path) == ["c.h5"]  # no temporary left behind
    with h5py.File(path, "r") as f:
        assert f.attrs["sha256"] == checkpoint.checksum(c.params, c.optimizer_state)


def test_meta_round_trip_rebuilds_shapes():
    c = sample()
    d = Checkpoint.from_meta(c.meta())
    assert d.arch == c.arch and d.params.shape == c.params.shape
    assert len(d.optimizer_state) == 2 and d.config == c.config


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.h5")
    checkpoint.save(path, sample())
    before = open(path, "rb").read()
    monkeypatch.setattr(checkpoint, "_fsync_path",
                        lambda p: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(
        RunError, match="No space left on device; the previous checkpoint is intact"
    ):
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


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    path = str(tmp_path / "c.h5")
    c = sample()
    checkpoint.save(path, c)
    data = open(path, "rb").read()
    truncated = tmp_path / "t.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="truncated or not HDF5|damaged"):
        checkpoint.load(str(truncated))
    # flip the bytes of W0 inside the file: HDF5 still opens it, the checksum must catch it
    W0 = layer_views(c.arch, c.params)[0][0]
    pos = data.find(W0.tobytes()[:16])
    assert pos > 0
    corrupt = bytearray(data)
    corrupt[pos:pos + 4] = b"\x00\x00\x80\x7f"
    (tmp_path / "x.h5").write_bytes(bytes(corrupt))
    with pytest.raises(UsageError, match="fails its checksum"):
        checkpoint.load(str(tmp_path / "x.h5"))


def test_keep_last_k_checkpoints(tmp_path):
    path = str(tmp_path / "checkpoint.h5")
    c = sample()
    for step in (10, 20, 30, 40):
        c.global_step = step
        c.params[0] = step
        checkpoint.save(path, c, keep=2)
    kept = sorted(os.listdir(tmp_path / "checkpoints"))
    assert kept == ["step-0000030.h5", "step-0000040.h5"]
    assert checkpoint.load(str(tmp_path / "checkpoints" / kept[0])).params[0] == 30
    assert checkpoint.load(path).params[0] == 40
