"""The engine interface: how one global batch becomes one update. The training loop, evaluate and
predict talk to an Engine only; session.make_engine picks the implementation once.

    DataParallelEngine   (data_parallel.py) every rank holds the whole network: fused step, one
                         Allreduce
    PipelineEngine       (pipeline.py) ranks hold consecutive layers; micro-batches over Send/Recv

Every step also agrees, across all ranks, whether any rank was asked to stop (a signal) and
whether the reduced loss and gradients are finite; a non-finite update is never applied.
"""
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from . import kernels
from .model import NO_DROPOUT, NO_ROWS, Dropout
from .optim import Optimizer, Tensors
from .runtime.timeline import NullTimeline
from .runtime.watchdog import NullWatchdog


@dataclass
class StepResult:
    loss: float      # this rank's loss sum over its rows
    correct: int     # this rank's correct predictions
    rows: int        # rows this rank counts for metrics (0 on pipeline stages without targets)
    stop: bool       # some rank was asked to stop (identical on every rank)
    finite: bool     # the step's loss and gradients were finite and the update was applied
    grad_norm: float = 0.0  # L2 norm of the averaged gradient before clipping (when clipping)
    weight: float = None    # a weighted loss: the sum of this rank's row weights (else: rows)


class Engine(ABC):
    """What every engine offers. Attributes: `wants_x`/`wants_y` (which data this rank reads),
    `data_rank`/`data_size` (its place among the data-parallel readers), `optimizer` (None when
    the engine only runs forward), `params` (this rank's parameters), and `timeline`/`watchdog`,
    which the training loop may replace."""
    wants_x = wants_y = True
    timeline = NullTimeline()
    watchdog = NullWatchdog()
    clip_grad_norm = 0.0  # > 0: the averaged gradient is scaled down to this L2 norm
    dropout = None  # a model.Dropout while training with dropout (set_dropout)
    last_hidden = False  # this rank's last layer is a hidden one (a pipeline stage before the last)

    @abstractmethod
    def warmup(self, x, y):
        """Compile (or load from the cache) every kernel this rank will call; no communication."""

    @abstractmethod
    def step(self, xb, yb, rows, scale, stop=False, ids=None, weights=None):
        """One global batch: this rank's rows (xb, yb; `rows` of them; `ids` their file rows,
        needed with dropout; `weights` their own weights, --weight-key) with gradients of scale *
        (summed, weighted loss), reduced, then one update. Returns a StepResult."""

    def set_dropout(self, p, seed):
        self.dropout = Dropout(p, seed, self.last_hidden) if p else None

    def dropout_now(self, ids):
        """(drop, rows) for the kernels in this update: no dropout unless one is set."""
        if self.dropout is None or self.dropout.p == 0:
            return NO_DROPOUT, NO_ROWS
        return self.dropout.for_update(self.optimizer.t), ids

    @abstractmethod
    def forward_chunks(self, n, read_x, consume):
        """Raw outputs for this reader's n rows chunk by chunk: read_x(offset, m) gives inputs;
        consume(offset, outputs) is called where the outputs are (the last stage)."""

    @abstractmethod
    def full_state(self):
        """(parameters, optimizer state buffers) of the whole network in checkpoint layout on
        rank 0 (None elsewhere where they are not gathered)."""

    @abstractmethod
    def replicas_agree(self):
        """True on every rank when every replica holds the same parameters (collective)."""

    def stats(self):
        """Engine-specific figures for the summary (pipeline stages: compute, wait, bubble)."""
        return {}

    def describe(self):
        """How the work is split, for the start-up line."""
        return "data parallel"

    def stage_summary(self):
        """Per-stage figures, the same list on every rank (collective; [] without stages)."""
        return []

    def close(self):  # noqa: B027 - most engines hold nothing beyond memory
        """Release what the engine holds beyond memory (collective; after the last step)."""


@dataclass
class Agreement:
    """What every rank agrees on after a step's reduction (identical on every rank)."""
    stop: bool          # some rank was asked to stop
    finite: bool        # the summed loss and gradient are finite: the update may be applied
    grads: object       # the summed gradient this rank updates with (the whole, or its slice)
    squares: object     # () -> the summed gradient's squared L2 norm (asked only when clipping)


def agreed_step(engine, agreed, update):
    """The tail every engine shares: when every rank agreed the step is finite, clip the summed
    gradient to the engine's clip_grad_norm by the agreed norm, then update(grads). Returns the
    norm before clipping (0.0 when not clipping or not finite)."""
    norm = 0.0
    if agreed.finite:
        if engine.clip_grad_norm:
            norm = math.sqrt(agreed.squares())
            clip_(agreed.grads, norm, engine.clip_grad_norm)
        update(agreed.grads)
    return norm


def clip_(grads, norm, max_norm):
    """Scale grads in place by min(1, max_norm / (norm + 1e-6)), as torch's clip_grad_norm_."""
    factor = max_norm / (norm + 1e-6)
    if factor < 1:
        kernels.scale_(grads, grads.dtype.type(factor))


def make_optimizer(settings, n, state=None, spans=(), window=None, reduce_norms=None,
                   dtype=np.float32):
    """An Optimizer over n parameters of this dtype (settings: its keyword arguments, or None for
    an engine that only runs forward), with checkpointed (step, buffers) put in place when given.
    spans: the tensors of the buffer this one is (a window of: [start, stop), a shard's block) as
    model.tensor_spans gives them; reduce_norms sums a shard's squares over its group."""
    if settings is None:
        return None
    tensors = Tensors.of(spans, *(window or (0, n))) if spans else None
    opt = Optimizer(n=n, tensors=tensors, reduce_norms=reduce_norms, dtype=dtype, **settings)
    if state is not None:
        step, buffers = state
        opt.t = step
        for mine, saved in zip(opt.state, buffers):
            mine[...] = saved
    return opt
