"""Learning-rate schedules and the batch-size scaling rule: pure functions of plain numbers.

With t the optimizer updates already made (0 for the first), T the run's total updates and W the
warm-up updates:
    t < W      lr = base * (t + 1) / W
    constant   lr = base
    step       lr = base * gamma ** floor((t - W) / step_size)
    cosine     lr = min_lr + (base - min_lr) * (1 + cos(pi * (t - W) / max(1, T - W))) / 2
The base rate follows the scaling rule for a global batch B and a reference batch B0 (Goyal et
al., 2017): none: lr; linear: lr * B / B0; sqrt: lr * sqrt(B / B0).
"""
import math
from dataclasses import dataclass

SCHEDULES = ("constant", "step", "cosine")
SCALING_RULES = ("none", "linear", "sqrt")


def base_lr(lr, rule, batch, ref_batch):
    if rule == "linear":
        return lr * batch / ref_batch
    if rule == "sqrt":
        return lr * math.sqrt(batch / ref_batch)
    return lr


def lr_at(t, base, kind="constant", warmup=0, total=1, min_lr=0.0, step_size=1, gamma=1.0):
    """The learning rate of update t (0 for the first)."""
    if t < warmup:
        return base * (t + 1) / warmup
    if kind == "step":
        return base * gamma ** ((t - warmup) // step_size)
    if kind == "cosine":
        progress = (t - warmup) / max(1, total - warmup)
        return min_lr + (base - min_lr) * (1 + math.cos(math.pi * progress)) / 2
    return base


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every update of a run: the optimizer asks it before each update."""
    base: float
    kind: str = "constant"
    warmup: int = 0
    total: int = 1
    min_lr: float = 0.0
    step_size: int = 1
    gamma: float = 1.0

    def __call__(self, t):
        return lr_at(t, self.base, self.kind, self.warmup, self.total, self.min_lr,
                     self.step_size, self.gamma)
