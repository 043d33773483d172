"""Planning, pure functions of plain ints (no h5py, no MPI): which rows a rank owns in every global
batch, how layers are split into pipeline stages, how ranks form the stage x replica grid, and the
order of forward/backward micro-batch steps on each stage.

Rows: with B the global batch and N rows, global batch k is rows [k*B, min((k+1)*B, N)) of the data,
and reader r of R owns its own contiguous part of every global batch (parts as even as possible, the
first readers one row longer). Every reader runs ceil(N/B) steps per epoch by construction; a reader
whose part of a batch is empty takes part with zero rows. Results are then independent of R.

Grid: world = S stages x R replicas; rank = replica * S + stage, so the S ranks of one replica are
neighbours (a pipeline communicator per replica) and the R ranks of one stage form its
data-parallel communicator.

Schedules return a stage's list of ("F", j) / ("B", j) for micro-batches j = 0..M-1:
  gpipe  all forwards, then all backwards: every stage keeps M micro-batches of activations;
  1f1b   min(S-s-1, M) warm-up forwards, then one forward / one backward alternately, then the
         remaining backwards: stage s keeps at most S-s micro-batches of activations.
"""
from dataclasses import dataclass

import numpy as np

from .errors import UsageError


def even_part(n, parts, i):
    """(offset, count) of part i when n items are split into `parts` near-equal contiguous parts."""
    base, extra = divmod(n, parts)
    return i * base + min(i, extra), base + (1 if i < extra else 0)


@dataclass(frozen=True)
class BatchPlan:
    """The rows rank `rank` of `size` owns when N rows are cut into global batches of B."""
    n_rows: int
    batch: int
    rank: int = 0
    size: int = 1

    @property
    def steps_per_epoch(self):
        return -(-self.n_rows // self.batch)

    @property
    def n_full(self):
        return self.n_rows // self.batch

    @property
    def last_batch(self):
        """Rows in the last, shorter global batch (0 when B divides N)."""
        return self.n_rows - self.n_full * self.batch

    def global_batch_rows(self, k):
        """Rows in global batch k (the same for every rank)."""
        return self.batch if k < self.n_full else self.last_batch

    def full_part(self):
        return even_part(self.batch, self.size, self.rank)

    def last_part(self):
        return even_part(self.last_batch, self.size, self.rank)

    def local_counts(self):
        """This rank's rows in each global batch, in step order (length steps_per_epoch)."""
        counts = [self.full_part()[1]] * self.n_full
        if self.last_batch:
            counts.append(self.last_part()[1])
        return np.array(counts, np.int64)

    @property
    def n_local(self):
        return int(self.local_counts().sum())

    def owned_rows(self):
        """Global row indices this rank owns, in step order (for tests and checks)."""
        off, cnt = self.full_part()
        rows = [k * self.batch + off + np.arange(cnt) for k in range(self.n_full)]
        if self.last_batch:
            off, cnt = self.last_part()
            rows.append(self.n_full * self.batch + off + np.arange(cnt))
        return np.concatenate(rows) if rows else np.zeros(0, np.int64)


def position_owners(plan_n_rows, batch, size):
    """For every position p of an epoch's row order: (rank that owns it, its index among that
    rank's rows), following the same split as BatchPlan. Vectorised, O(N) int64."""
    p = np.arange(plan_n_rows, dtype=np.int64)
    k, q = np.divmod(p, batch)
    n_full = plan_n_rows // batch
    owner = np.empty(plan_n_rows, np.int64)
    local = np.empty(plan_n_rows, np.int64)
    for last in (False, True):
        sel = (k == n_full) if last else (k < n_full)
        if not sel.any():
            continue
        rows = plan_n_rows - n_full * batch if last else batch
        base, extra = divmod(rows, size)
        qq = q[sel]
        cut = extra * (base + 1)
        r = np.where(qq < cut, qq // (base + 1), extra + (qq - cut) // max(base, 1))
        off = r * base + np.minimum(r, extra)
        cnt_full = np.array([even_part(batch, size, i)[1] for i in range(size)], np.int64)
        before = n_full * cnt_full[r] if last else k[sel] * cnt_full[r]
        owner[sel], local[sel] = r, before + (qq - off)
    return owner, local


SCHEDULES = ("gpipe", "1f1b")


def layer_flops(sizes):
    """Training FLOPs per row of each layer: forward 2*fi*fo, weight gradient 2*fi*fo, input
    gradient 2*fi*fo except for the first layer, whose input needs none."""
    return [(4 if l == 0 else 6) * fi * fo for l, (fi, fo) in enumerate(zip(sizes[:-1], sizes[1:]))]


def balanced_partition(costs, stages):
    """Layers per stage: contiguous groups of `costs` minimising the largest group's sum."""
    n = len(costs)
    if stages > n:
        raise UsageError(f"--pipeline-stages {stages} exceeds the network's {n} layers")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest possible maximum over s stages holding the first i layers
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def parse_partition(text, n_layers, stages):
    """`--partition 2,1,1`: layers per stage, validated."""
    try:
        counts = [int(p) for p in str(text).replace(" ", "").split(",") if p]
    except ValueError:
        raise UsageError(
            f"--partition must be comma-separated layer counts, got {text!r}"
        ) from None
    if len(counts) != stages or any(c < 1 for c in counts) or sum(counts) != n_layers:
        raise UsageError(f"--partition {text} must give {stages} positive layer counts (one per "
                         f"stage) adding up to the network's {n_layers} layers")
    return counts


def stage_layers(counts, stage):
    """(first layer, end layer) of a stage given the layers per stage."""
    first = sum(counts[:stage])
    return first, first + counts[stage]


@dataclass(frozen=True)
class Grid:
    """Where a rank sits in the stage x replica grid."""
    stages: int
    world: int
    rank: int = 0

    def __post_init__(self):
        if self.stages < 1:
            raise UsageError(f"--pipeline-stages must be positive, got {self.stages}")
        if self.world % self.stages:
            raise UsageError(f"--pipeline-stages {self.stages} does not divide the {self.world} "
                             "ranks (world = stages x replicas)")

    @property
    def replicas(self):
        return self.world // self.stages

    @property
    def stage(self):
        return self.rank % self.stages

    @property
    def replica(self):
        return self.rank // self.stages

    @property
    def is_first(self):
        return self.stage == 0

    @property
    def is_last(self):
        return self.stage == self.stages - 1


def warmup_forwards(kind, stages, stage, micro):
    return micro if kind == "gpipe" else min(stages - stage - 1, micro)


def schedule(kind, stages, stage, micro):
    """The order of ("F", j) and ("B", j) steps on `stage` for `micro` micro-batches."""
    if kind not in SCHEDULES:
        raise UsageError(f"unknown schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
    w = warmup_forwards(kind, stages, stage, micro)
    ops = [("F", j) for j in range(w)]
    for i in range(micro - w):
        ops += [("F", w + i), ("B", i)]
    ops += [("B", j) for j in range(micro - w, micro)]
    return ops


def in_flight(kind, stages, stage, micro):
    """Most micro-batches whose activations a stage holds at once under the schedule."""
    return min(warmup_forwards(kind, stages, stage, micro) + 1, micro) if micro else 0


def ideal_bubble(stages, micro):
    """Idle fraction of a balanced pipeline with free communication: (S-1)/(M+S-1)."""
    return (stages - 1) / (micro + stages - 1)
