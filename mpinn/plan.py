"""Pipeline planning, pure functions of plain ints: how layers are split into stages, how ranks form
the stage x replica grid, and the order of forward/backward micro-batch steps on each stage.

Grid: world = S stages x R replicas; rank = replica * S + stage, so the S ranks of one replica are
neighbours (a pipeline communicator per replica) and the R ranks of one stage form its
data-parallel communicator.

Schedules return a stage's list of ("F", j) / ("B", j) for micro-batches j = 0..M-1:
  gpipe  all forwards, then all backwards: every stage keeps M micro-batches of activations;
  1f1b   min(S-s-1, M) warm-up forwards, then one forward / one backward alternately, then the
         remaining backwards: stage s keeps at most S-s micro-batches of activations.
"""
from dataclasses import dataclass

from .errors import UsageError

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
        raise UsageError(f"--partition must be comma-separated layer counts, got {text!r}") from None
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
