"""Learning-rate schedules and the batch-size scaling rule: pure functions of plain numbers.

With t the optimizer updates already made (0 for the first), T the run's total updates and W the
warm-up updates:
    t < W      lr = base * (t + 1) / W
    constant   lr = base
    step       lr = base * gamma ** floor((t - W) / step_size)
    cosine     lr = min_lr + (base - min_lr) * (1 + cos(pi * (t - W) / max(1, T - W))) / 2
    plateau    lr = the Plateau's current rate: base, multiplied by --plateau-factor (not below
               min_lr) whenever the monitored validation figure has not improved for more than
               --plateau-patience epochs, then --plateau-cooldown epochs of rest (PyTorch's
               ReduceLROnPlateau, threshold mode "rel")
The base rate follows the scaling rule for a global batch B and a reference batch B0 (Goyal et
al., 2017): none: lr; linear: lr * B / B0; sqrt: lr * sqrt(B / B0).
"""
import math
from dataclasses import dataclass

SCHEDULES = ("constant", "step", "cosine", "plateau")
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


@dataclass
class Plateau:
    """The rate of a plateau schedule and what decides its next cut: the best monitored value so
    far, the epochs without improvement and the cooldown left. Stepped once per epoch with the
    validation figure, which every rank holds alike, so every rank cuts at the same epoch."""
    lr: float
    mode: str = "min"
    factor: float = 0.1
    patience: int = 10
    cooldown: int = 0
    threshold: float = 1e-4
    min_lr: float = 0.0
    best: float = None
    bad_epochs: int = 0
    cooldown_left: int = 0

    def better(self, value):
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best * (1 - self.threshold)
        return value > self.best * (1 + self.threshold)

    def step(self, value):
        """After an epoch: the monitored figure; cuts the rate when it has stalled."""
        if self.better(value):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.patience:
            cut = max(self.lr * self.factor, self.min_lr)
            if self.lr - cut > 1e-8:  # PyTorch's eps: no cut smaller than that
                self.lr = cut
            self.cooldown_left, self.bad_epochs = self.cooldown, 0

    def state(self):
        return {"lr": self.lr, "best": self.best, "bad_epochs": self.bad_epochs,
                "cooldown_left": self.cooldown_left}

    def restore(self, saved):
        for key in ("lr", "best", "bad_epochs", "cooldown_left"):
            if key in saved:
                setattr(self, key, saved[key])


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
    plateau: Plateau = None  # kind "plateau": the rate after warm-up, cut by validation

    def __call__(self, t):
        if self.kind == "plateau" and t >= self.warmup:
            return self.plateau.lr
        return lr_at(t, self.base, self.kind, self.warmup, self.total, self.min_lr,
                     self.step_size, self.gamma)
