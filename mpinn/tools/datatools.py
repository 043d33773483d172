"""`mpinn data synth`, `mpinn data inspect` and `mpinn data stats`: make a classification set of
any size, look inside an HDF5 data file, and summarise its columns as --scale-inputs would (the
same moments, data/scaling.py), all streaming in chunks so none ever holds the whole file.

synth: rows come from a seeded random teacher network (tanh hidden layers, argmax of the output);
row block b (BLOCK rows) is drawn from a generator seeded by (seed, b), so every row is the same
whatever --chunk-rows the file is written with.
"""
import json
import os

import h5py
import numpy as np

from ..config import parse_hidden
from ..data import open_h5
from ..data.scaling import Moments, spread_warning
from ..errors import UsageError
from ..log import Log
from ..outputs import check_output_path, h5_written_whole
from ..runtime.signals import signals_held
from .convert import stored_chunk_rows

BLOCK = 1 << 16  # rows per generator block: fixed, so rows do not depend on the chunking


class Teacher:
    def __init__(self, features, hidden, classes, seed):
        rng = np.random.default_rng([seed, 2**32 - 1])  # weights: a stream no row block uses
        sizes = (features,) + hidden + (classes,)
        self.layers = [
            (
                rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32),
                rng.normal(0, 0.1, b).astype(np.float32),
            )
            for a, b in zip(sizes[:-1], sizes[1:])
        ]

    def labels(self, x):
        h = x
        for i, (W, b) in enumerate(self.layers):
            h = h @ W + b
            if i < len(self.layers) - 1:
                h = np.tanh(h)
        return h.argmax(axis=1).astype(np.int64)


def synth_block(b, rows, features, seed, teacher):
    x = np.random.default_rng([seed, b]).standard_normal((rows, features), dtype=np.float32)
    return x, teacher.labels(x)


def synth(cfg):
    hidden = parse_hidden(cfg.hidden)
    check_output_path(cfg.out, overwrite=cfg.overwrite)
    teacher = Teacher(cfg.features, hidden, cfg.classes, cfg.seed)
    n, chunk = cfg.rows, min(stored_chunk_rows(cfg.chunk_rows, cfg.features), cfg.rows)
    options = {} if cfg.compression == "none" else {"compression": cfg.compression}
    cached = (-1, None, None)
    with h5_written_whole(cfg.out) as f:
        with signals_held():  # not inside h5py's write callbacks (runtime/signals.py)
            X = f.create_dataset("X", (n, cfg.features), np.float32,
                                 chunks=(chunk, cfg.features), **options)
            y = f.create_dataset("y", (n,), np.int64, chunks=(chunk,), **options)
            f.attrs.update({"source": "mpinn data synth", "seed": cfg.seed,
                            "teacher_hidden": cfg.hidden, "classes": cfg.classes})
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            xs, ys, row = [], [], start
            while row < stop:  # the generator blocks this chunk overlaps
                b = row // BLOCK
                if cached[0] != b:
                    rows_b = min(BLOCK, n - b * BLOCK)
                    cached = (b, *synth_block(b, rows_b, cfg.features, cfg.seed, teacher))
                take = min(stop, (b + 1) * BLOCK) - row
                xs.append(cached[1][row - b * BLOCK: row - b * BLOCK + take])
                ys.append(cached[2][row - b * BLOCK: row - b * BLOCK + take])
                row += take
            with signals_held():
                X[start:stop] = np.concatenate(xs)
                y[start:stop] = np.concatenate(ys)
    Log().info(f"wrote {n:,} rows x {cfg.features} features, {cfg.classes} classes to {cfg.out} "
               f"({os.path.getsize(cfg.out) / 2**20:,.1f} MiB)")


def _dataset_summary(ds, chunk_rows):
    out = {"shape": list(ds.shape), "dtype": str(ds.dtype), "chunks": list(ds.chunks or []) or None,
           "compression": ds.compression}
    if ds.size == 0 or not (np.issubdtype(ds.dtype, np.number) or ds.dtype == bool):
        return out
    lo, hi, total, count, nan, inf = np.inf, -np.inf, 0.0, 0, 0, 0
    counts = {}
    integer = np.issubdtype(ds.dtype, np.integer) and ds.ndim == 1
    for s in range(0, ds.shape[0], chunk_rows):
        a = ds[s:s + chunk_rows]
        if np.issubdtype(a.dtype, np.floating):
            nan += int(np.isnan(a).sum())
            inf += int(np.isinf(a).sum())
            a = a[np.isfinite(a)]
        if a.size:
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
            total += float(a.astype(np.float64).sum())
            count += a.size
        if integer:
            values, n = np.unique(a, return_counts=True)
            for v, c in zip(values.tolist(), n.tolist()):
                counts[v] = counts.get(v, 0) + c
    out.update({"min": lo if count else None, "max": hi if count else None,
                "mean": total / count if count else None, "nan": nan, "inf": inf})
    if integer:
        out["class_counts"] = {str(k): v for k, v in sorted(counts.items())}
    return out


def inspect(cfg):
    with open_h5(cfg.path) as f:
        report = {"file": cfg.path, "bytes": os.path.getsize(cfg.path), "datasets": {}}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                report["datasets"][name] = _dataset_summary(obj, cfg.chunk_rows)
        f.visititems(visit)
    log = Log()
    if cfg.json:
        log.info(json.dumps(report))
        return report
    log.info(f"{cfg.path}: {report['bytes'] / 2**20:,.1f} MiB")
    for name, d in report["datasets"].items():
        line = (f"  {name}: shape {tuple(d['shape'])}, {d['dtype']}, chunks "
                f"{tuple(d['chunks']) if d['chunks'] else 'contiguous'}"
                + (f", {d['compression']}" if d["compression"] else ""))
        if d.get("min") is not None:
            line += f", range [{d['min']:.4g}, {d['max']:.4g}], mean {d['mean']:.4g}"
        if d.get("nan") or d.get("inf"):
            line += f", {d['nan']} NaN, {d['inf']} inf"
        log.info(line)
        if "class_counts" in d:
            counts = d["class_counts"]
            total = sum(counts.values())
            log.info("    classes: " + ", ".join(f"{k}: {v} ({100 * v / total:.1f}%)"
                                                 for k, v in counts.items()))
    return report


def column_moments(ds, chunk_rows):
    """The moments of each column of a dataset (1-D: one column), read chunk_rows at a time."""
    total = Moments.empty(1 if ds.ndim == 1 else ds.shape[1])
    for s in range(0, ds.shape[0], chunk_rows):
        total = total.merge(Moments.of(ds[s:s + chunk_rows]))
    return total


def _summary(m):
    return {"count": m.count, "mean": m.mean.tolist(), "std": m.std.tolist(),
            "min": m.low.tolist(), "max": m.high.tolist()}


def stats(cfg):
    """Per-column statistics of the inputs, and of the targets when they are floats."""
    with open_h5(cfg.path) as f:
        for key in (cfg.x_key,):
            if key not in f:
                raise UsageError(f"{cfg.path}: no dataset {key!r} (use --x-key)")
        X = f[cfg.x_key]
        if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
            raise UsageError(f"{cfg.path}:{cfg.x_key} must be a 2-D numeric dataset; it has "
                             f"shape {X.shape} and dtype {X.dtype}")
        inputs = column_moments(X, cfg.chunk_rows)
        y = f.get(cfg.y_key)
        targets = (column_moments(y, cfg.chunk_rows) if y is not None
                   and np.issubdtype(y.dtype, np.floating) else None)
    report = {"file": cfg.path, "rows": inputs.count, "inputs": _summary(inputs),
              "targets": _summary(targets) if targets is not None else None,
              "warning": spread_warning(inputs)}
    log = Log()
    if cfg.json:
        log.info(json.dumps(report))
        return report
    log.info(f"{cfg.path}: {inputs.count} rows")
    for name, m in (("inputs", inputs), ("targets", targets)):
        if m is None:
            continue
        key = cfg.x_key if name == "inputs" else cfg.y_key
        log.info(f"  {name} ({key}): column, mean, std, min, max")
        for j in range(len(m.mean)):
            log.info(f"    {j:>5} {m.mean[j]:>12.5g} {m.std[j]:>12.5g} {m.low[j]:>12.5g} "
                     f"{m.high[j]:>12.5g}")
    if report["warning"]:
        log.info(f"  note: {report['warning']}")
    return report


def run_stats(cfg, explicit, comm=None):
    return stats(cfg)


def run_synth(cfg, explicit, comm=None):
    return synth(cfg)


def run_inspect(cfg, explicit, comm=None):
    return inspect(cfg)
