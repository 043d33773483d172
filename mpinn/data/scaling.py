"""Feature and target scaling (--scale-inputs, --scale-targets): statistics of the training rows
merged exactly across ranks, and the constants a checkpoint carries so that evaluate, predict,
the Python API and ONNX export apply what training applied.

Statistics are float64 (count, mean, M2, min, max) per column. Each rank summarises the rows it
reads (in memory, or chunk by chunk when streaming); the summaries are merged in rank order with
the pairwise formulas of Chan, Golub and LeVeque (1979), so the result is the whole file's
statistics whatever the rank count or the chunking, equal to NumPy's to float64 rounding.
A column that does not vary is scaled by 1, as scikit-learn's StandardScaler and MinMaxScaler do.
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class Moments:
    """Count, mean, sum of squared deviations (M2), min and max of each column."""
    count: int
    mean: np.ndarray
    m2: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def empty(cls, columns):
        return cls(0, np.zeros(columns), np.zeros(columns), np.full(columns, np.inf),
                   np.full(columns, -np.inf))

    @classmethod
    def of(cls, a):
        """The moments of the rows of a (rows x columns; 1-D is one column)."""
        a = np.asarray(a, np.float64)
        a = a.reshape(len(a), -1)
        if not len(a):
            return cls.empty(a.shape[1])
        mean = a.mean(axis=0)
        return cls(len(a), mean, ((a - mean) ** 2).sum(axis=0), a.min(axis=0), a.max(axis=0))

    def merge(self, other):
        """The moments of both sets of rows (Chan et al.'s update of mean and M2)."""
        if not other.count:
            return self
        if not self.count:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / n)
        return Moments(n, mean, m2, np.minimum(self.low, other.low),
                       np.maximum(self.high, other.high))

    @property
    def std(self):
        """The population standard deviation (ddof 0, as StandardScaler)."""
        return np.sqrt(self.m2 / max(self.count, 1))

    def pack(self):
        """One float64 vector (for a collective): count, then mean, M2, min, max."""
        return np.concatenate([[float(self.count)], self.mean, self.m2, self.low, self.high])

    @classmethod
    def unpack(cls, v):
        c = (len(v) - 1) // 4
        return cls(int(v[0]), *(np.array(v[1 + i * c:1 + (i + 1) * c]) for i in range(4)))


def merged(parts):
    """The moments of every part's rows, merged in order."""
    total = parts[0]
    for p in parts[1:]:
        total = total.merge(p)
    return total


@dataclass
class Scale:
    """x -> (x - offset) / scale, per column; kind says how offset and scale were chosen."""
    kind: str
    offset: np.ndarray
    scale: np.ndarray

    @classmethod
    def fitted(cls, kind, moments):
        if kind == "standard":
            offset, spread = moments.mean, moments.std
        elif kind == "minmax":
            offset, spread = moments.low, moments.high - moments.low
        else:
            raise ValueError(kind)
        spread = np.where(spread > 0, spread, 1.0)  # a constant column: centred, not divided
        return cls(kind, offset.astype(np.float64), spread.astype(np.float64))

    def apply_(self, a):
        """Scale the rows of a float32 array in place; returns it."""
        a -= self.offset.astype(a.dtype)
        a /= self.scale.astype(a.dtype)
        return a

    def invert_(self, a):
        """Undo apply_ in place (network outputs back in the targets' units)."""
        a *= self.scale.astype(a.dtype)
        a += self.offset.astype(a.dtype)
        return a


@dataclass
class Scaling:
    """What a network's inputs and (regression) targets were scaled by in training; None: used
    as they are. Travels in the checkpoint as JSON (float64 constants, exact in JSON)."""
    inputs: Scale | None = None
    targets: Scale | None = None

    def __bool__(self):
        return self.inputs is not None or self.targets is not None

    def inputs_(self, x):
        return x if self.inputs is None or x is None else self.inputs.apply_(x)

    def targets_(self, y):
        return y if self.targets is None or y is None else self.targets.apply_(y)

    def outputs_(self, out):
        """Network outputs back in the targets' units."""
        return out if self.targets is None else self.targets.invert_(out)

    def to_json(self):
        return {name: {"kind": s.kind, "offset": s.offset.tolist(), "scale": s.scale.tolist()}
                for name, s in (("inputs", self.inputs), ("targets", self.targets))
                if s is not None}

    @classmethod
    def from_json(cls, d):
        def scale(s):
            return None if s is None else Scale(s["kind"], np.array(s["offset"], np.float64),
                                                np.array(s["scale"], np.float64))
        return cls(scale((d or {}).get("inputs")), scale((d or {}).get("targets")))

    def kinds(self):
        """(input kind, target kind) as the options name them."""
        return (self.inputs.kind if self.inputs else "none",
                self.targets.kind if self.targets else "none")


def merged_across(comm, moments, columns):
    """Every rank's moments (of `columns` columns; None where a rank holds none of those rows)
    merged in rank order, the same on every rank."""
    mine = moments if moments is not None else Moments.empty(columns)
    table = np.zeros((comm.size, 1 + 4 * columns), np.float64)
    table[comm.rank] = mine.pack()
    comm.allgather_(table)
    return merged([Moments.unpack(row) for row in table])


def moments_in_chunks(read, rows, chunk_rows):
    """The moments of rows [rows.start, rows.stop) of a file read `chunk_rows` at a time."""
    total = Moments.empty(0)
    for a in range(rows.start, rows.stop, max(chunk_rows, 1)):
        part = Moments.of(read(np.arange(a, min(a + chunk_rows, rows.stop))))
        total = part if not total.count else total.merge(part)
    return total if total.count else None


def spread_warning(moments):
    """A warning when unscaled inputs are of very different magnitudes (largest |value| of one
    feature over 1000 times another's) or dominated by an offset (|mean| over 100 standard
    deviations): an MLP trains poorly on them. None otherwise: the bundled digits (pixels in
    [0, 1], some almost always 0) are not flagged."""
    magnitude = np.maximum(np.abs(moments.low), np.abs(moments.high))
    magnitude = magnitude[np.isfinite(magnitude) & (magnitude > 0)]
    std = moments.std
    offset = np.abs(moments.mean[std > 0]) / std[std > 0]
    if len(magnitude) >= 2 and magnitude.max() > 1000 * magnitude.min():
        why = (f"magnitudes range from {magnitude.min():.3g} to {magnitude.max():.3g}")
    elif len(offset) and offset.max() > 100:
        why = f"a feature's mean is {offset.max():.3g} standard deviations from 0"
    else:
        return None
    return (f"the input features' {why}: a network trains poorly on unscaled features like "
            "these; consider --scale-inputs standard")
