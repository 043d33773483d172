"""Checkpoint files: atomic write (temporary file, fsync, rename) and validated load.

Format (HDF5), version FORMAT_VERSION:
    /params/W0, /params/b0, ...          per-layer weights (fan_in, fan_out) and biases, float32
                                         (float64 for a --dtype float64 network: attr dtype)
    /optimizer/state0, state1            flat optimizer buffers (layout of the flat parameters)
    attrs on /: format_version, sizes, activation, output_activation, loss, epoch, global_step,
                seed, config (the resolved run config as JSON), state (the training loop's own
                state as JSON: early stopping's best loss and patience), mpinn_version,
                sha256 (of the flat parameters, then each optimizer state buffer, as stored)
    attrs on /optimizer: name, step
Only rank 0 calls save(); load() runs on one rank and the caller broadcasts (train.py). A file
whose data does not match its checksum, or that HDF5 cannot read, is refused, never loaded half.
"""
import glob
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field

import h5py
import numpy as np

from .data.scaling import Scaling
from .errors import RunError, UsageError
from .model import Architecture, layer_views
from .outputs import fsync_path as _fsync_path  # tests patch it here

FORMAT_VERSION = 2  # 2: a `scaling` attribute; a checkpoint without one is still written as 1


@dataclass
class Checkpoint:
    arch: Architecture
    params: np.ndarray
    optimizer: str = ""
    optimizer_step: int = 0
    optimizer_state: list = field(default_factory=list)
    epoch: int = 0
    global_step: int = 0
    seed: int = 0
    config: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # the loop's own state (early stopping), as JSON
    scaling: Scaling = field(default_factory=Scaling)  # what inputs and targets are scaled by

    def meta(self):
        """Everything but the arrays, as JSON-able data (for broadcasting)."""
        return {"sizes": list(self.arch.sizes), "activation": self.arch.activation,
                "output_activation": self.arch.output_activation, "loss": self.arch.loss,
                "pos_weight": list(self.arch.pos_weight),
                "class_weight": list(self.arch.class_weight), "slope": self.arch.slope,
                "dtype": self.arch.dtype,
                "optimizer": self.optimizer,
                "optimizer_step": self.optimizer_step,
                "n_state": len(self.optimizer_state), "epoch": self.epoch,
                "global_step": self.global_step, "seed": self.seed, "config": self.config,
                "state": self.state, "scaling": self.scaling.to_json()}

    @classmethod
    def from_meta(cls, meta):
        arch = Architecture(tuple(meta["sizes"]), meta["activation"], meta["output_activation"],
                            meta["loss"], tuple(meta.get("pos_weight", ())),
                            tuple(meta.get("class_weight", ())), meta.get("slope", 0.01),
                            meta.get("dtype", "float32"))
        return cls(arch, np.zeros(arch.n_params, arch.float), meta["optimizer"],
                   meta["optimizer_step"], [np.zeros(arch.n_params, arch.float)
                                            for _ in range(meta["n_state"])],
                   meta["epoch"], meta["global_step"], meta["seed"], meta["config"],
                   meta.get("state", {}), Scaling.from_json(meta.get("scaling")))


def checksum(params, state):
    h = hashlib.sha256()
    for a in [params, *state]:
        h.update(np.ascontiguousarray(a, np.float64 if a.dtype == np.float64 else np.float32)
                 .tobytes())
    return h.hexdigest()


# the attributes that say what the arrays mean: covered by their own checksum (attrs_sha256), so
# an edited `sizes` is refused as corrupt instead of allocating whatever it says
COVERED_ATTRS = ("sizes", "activation", "output_activation", "loss", "epoch", "global_step",
                 "seed", "config", "state", "scaling", "pos_weight",
                 "class_weight", "leaky_slope", "dtype")


def attrs_checksum(attrs, optimizer_attrs):
    """SHA-256 of the covered attributes (and the optimizer's name and step) as read back."""
    plain = {k: _plain_attr(attrs[k]) for k in COVERED_ATTRS if k in attrs}
    if optimizer_attrs is not None:
        plain["optimizer"] = [_plain_attr(optimizer_attrs.get(k)) for k in ("name", "step")]
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def _plain_attr(value):
    if isinstance(value, np.ndarray):
        return [int(v) for v in value.tolist()]
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def save(path, ckpt, keep=0, before_rename=None, keep_in=None):
    """Write ckpt to path atomically: a reader sees the old file or the new one, never a torn one.
    keep > 0 also keeps it as step-NNNNNNN.h5 in the folder keep_in (default: checkpoints/ beside
    path) as a hard link, pruning all but the last `keep`. A failed write (full disk, file size
    limit, vanished folder) is a RunError that says the previous checkpoint is intact."""
    _write(path, ckpt, before_rename)
    if keep > 0:
        _keep(path, ckpt.global_step, keep, keep_in or os.path.join(
            os.path.dirname(os.path.abspath(path)), "checkpoints"))


def _reason(error):
    """The operating system's words for a failed write, also from inside HDF5's long messages."""
    found = re.search(r"error message = '([^']+)'", str(error))
    if found:
        return found.group(1)
    return getattr(error, "strerror", None) or str(error).splitlines()[0]


def _keep(path, step, keep, folder):
    target = os.path.join(folder, f"step-{step:07d}.h5")
    try:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(target):
            os.unlink(target)
        try:
            os.link(path, target)  # checkpoint.h5 is replaced by rename later: the link stays
        except OSError:
            shutil.copy2(path, target)
        for old in step_checkpoints(folder)[:-keep]:
            os.unlink(old)
    except OSError as e:
        raise RunError(f"cannot keep checkpoint copy {target}: {e.strerror or e}") from None


def step_checkpoints(folder):
    """The step-N.h5 files of a folder, oldest step first: by the number, since names sort as
    text wrongly past 7 digits (step-10000000.h5 before step-9999996.h5)."""
    def step(path):
        digits = os.path.basename(path)[len("step-"):-len(".h5")]
        return int(digits) if digits.isdigit() else -1
    return sorted(glob.glob(os.path.join(folder, "step-*.h5")), key=step)


def _write(path, ckpt, before_rename):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        try:
            _write_file(tmp, ckpt)
            _fsync_path(tmp)
        except (OSError, RuntimeError) as e:  # HDF5 reports a failed final flush as RuntimeError
            raise RunError(f"cannot write checkpoint {path}: {_reason(e)}; the previous "
                           "checkpoint is intact") from None
        if before_rename is not None:
            before_rename()
        try:
            os.replace(tmp, path)
            _fsync_path(os.path.dirname(os.path.abspath(path)))
        except OSError as e:
            raise RunError(f"cannot write checkpoint {path}: {_reason(e)}; the previous "
                           "checkpoint is intact") from None
        for stale in glob.glob(f"{path}.tmp-*"):  # left by a writer that was killed
            os.unlink(stale)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_file(tmp, ckpt):
    from . import __version__
    with h5py.File(tmp, "w") as f:
        g = f.create_group("params")
        for l, (W, b) in enumerate(layer_views(ckpt.arch, ckpt.params)):
            g.create_dataset(f"W{l}", data=W)
            g.create_dataset(f"b{l}", data=b)
        o = f.create_group("optimizer")
        o.attrs["name"] = ckpt.optimizer
        o.attrs["step"] = ckpt.optimizer_step
        for i, s in enumerate(ckpt.optimizer_state):
            o.create_dataset(f"state{i}", data=s)
        a = f.attrs
        # an older mpinn must refuse a scaled network rather than feed it raw rows
        a["format_version"] = FORMAT_VERSION if ckpt.scaling else 1
        a["mpinn_version"] = __version__
        a["sizes"] = np.array(ckpt.arch.sizes, np.int64)
        a["activation"] = ckpt.arch.activation
        a["output_activation"] = ckpt.arch.output_activation
        a["loss"] = ckpt.arch.loss
        for name in ("pos_weight", "class_weight"):  # only where set: older files stay as they were
            if getattr(ckpt.arch, name):
                a[name] = json.dumps(list(getattr(ckpt.arch, name)))
        if ckpt.arch.activation == "leaky_relu":
            a["leaky_slope"] = ckpt.arch.slope
        if ckpt.arch.dtype != "float32":
            a["dtype"] = ckpt.arch.dtype
        a["epoch"] = ckpt.epoch
        a["global_step"] = ckpt.global_step
        a["seed"] = ckpt.seed
        a["config"] = json.dumps(ckpt.config, sort_keys=True)
        a["state"] = json.dumps(ckpt.state, sort_keys=True)
        if ckpt.scaling:
            a["scaling"] = json.dumps(ckpt.scaling.to_json(), sort_keys=True)
        a["sha256"] = checksum(ckpt.params, ckpt.optimizer_state)
        a["attrs_sha256"] = attrs_checksum(a, o.attrs)


def load(path):
    """Read and validate a checkpoint; a missing, foreign, newer-format, truncated or corrupt file
    is a UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise UsageError(f"{path} is not a readable HDF5 checkpoint (truncated or not HDF5): "
                         f"{e}") from None
    try:
        with f:
            return _read(f, path)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise UsageError(f"{path} is damaged and was not loaded: {type(e).__name__}: {e}") from None


def _read(f, path):
    """Validate and read an open checkpoint file."""
    a = f.attrs
    if "format_version" not in a or "params" not in f:
        raise UsageError(f"{path} is not an mpinn checkpoint (no format_version or params)")
    version = int(a["format_version"])
    if version > FORMAT_VERSION:
        raise UsageError(f"{path} has checkpoint format {version}; this mpinn reads up to "
                         f"{FORMAT_VERSION} (upgrade mpinn)")
    o = f.get("optimizer")
    if "attrs_sha256" in a and attrs_checksum(a, o.attrs if o is not None else None) != str(
            a["attrs_sha256"]):
        raise UsageError(f"{path} fails its checksum: its attributes (network sizes, options, "
                         "steps) were changed or are corrupt; it was not loaded")
    arch = Architecture(tuple(int(s) for s in a["sizes"]), str(a["activation"]),
                        str(a["output_activation"]), str(a["loss"]),
                        *(tuple(json.loads(str(a[name]))) if name in a else ()
                          for name in ("pos_weight", "class_weight")),
                        float(a["leaky_slope"]) if "leaky_slope" in a else 0.01,
                        str(a["dtype"]) if "dtype" in a else "float32")
    for l, (fan_in, fan_out) in enumerate(zip(arch.sizes[:-1], arch.sizes[1:])):
        for name, shape in ((f"W{l}", (fan_in, fan_out)), (f"b{l}", (fan_out,))):
            ds = f["params"].get(name)  # before allocating what `sizes` says
            if ds is None or ds.shape != shape:
                raise UsageError(f"{path}: params/{name} is missing or has the wrong shape "
                                 f"for its network {'-'.join(map(str, arch.sizes))}")
    params = np.empty(arch.n_params, arch.float)
    for l, (W, b) in enumerate(layer_views(arch, params)):
        for name, view in ((f"W{l}", W), (f"b{l}", b)):
            view[...] = f["params"][name][...]
    state = []
    if o is not None:
        i = 0
        while f"state{i}" in o:
            state.append(np.asarray(o[f"state{i}"][...], arch.float))
            i += 1
    if "sha256" in a and checksum(params, state) != str(a["sha256"]):
        raise UsageError(f"{path} fails its checksum: its parameters or optimizer state are "
                         "corrupt; it was not loaded")
    return Checkpoint(arch, params, str(o.attrs["name"]) if o is not None else "",
                      int(o.attrs["step"]) if o is not None else 0, state, int(a["epoch"]),
                      int(a["global_step"]), int(a["seed"]), json.loads(a["config"]),
                      json.loads(a["state"]) if "state" in a else {},
                      Scaling.from_json(json.loads(a["scaling"]) if "scaling" in a else None))
