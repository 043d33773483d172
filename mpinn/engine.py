"""Engines: how one global batch becomes one update, behind one interface the training loop uses.

    DataParallelEngine   every rank holds the whole network: fused step, one Allreduce
    PipelineEngine       (pipeline.py) ranks hold consecutive layers; micro-batches over Send/Recv

Interface: `wants_x`/`wants_y` (which data this rank reads), `data_rank`/`data_size` (its place among
the data-parallel readers), `warmup(x, y)`, `step(xb, yb, rows, scale, stop) -> StepResult`,
`forward_chunks(n, read_x, consume)` for evaluation and prediction, `full_state()` (the whole
network's parameters and optimizer state on rank 0, in checkpoint layout), `replicas_agree()`,
`stats()` and `optimizer`.

Every step also agrees, across all ranks, whether any rank was asked to stop (a signal) and
whether the reduced loss and gradients are finite; a non-finite update is never applied.
"""
from dataclasses import dataclass
import time
import zlib

import numpy as np

from . import kernels
from .model import Network
from .optim import Optimizer
from .timeline import NullTimeline
from .watchdog import NullWatchdog


def make_optimizer(settings, n):
    """settings: dict of Optimizer keyword arguments (name, lr, ...) or None for no training."""
    return Optimizer(n=n, **settings) if settings is not None else None


def restore_optimizer(opt, step, state):
    """Put checkpointed optimizer state (already sliced to this rank's parameters) in place."""
    if opt is None or state is None:
        return
    opt.t = step
    for mine, saved in zip(opt.state, state):
        mine[...] = saved


def loss_sums_raw(out, y, loss, out_act):
    """(loss sum, correct) from raw network outputs (logits or out_act(z)); overwrites out."""
    if loss == "cross_entropy":
        l, c = kernels.cross_entropy_grad_(out, y, 1.0)
    else:
        l, c = kernels.mse_grad_(out, y, out_act, 1.0)
    return float(l), int(c)


@dataclass
class StepResult:
    loss: float      # this rank's loss sum over its rows
    correct: int     # this rank's correct predictions
    rows: int        # rows this rank counts for metrics (0 on pipeline stages without targets)
    stop: bool       # some rank was asked to stop (identical on every rank)
    finite: bool     # the step's loss and gradients were finite and the update was applied


class DataParallelEngine:
    wants_x = wants_y = True

    def __init__(self, comm, arch, params, max_rows, opt_settings=None, opt_state=None,
                 eval_rows=0, overlap_mb=0.0):
        self.comm, self.arch = comm, arch
        self.data_rank, self.data_size = comm.rank, comm.size
        n = arch.n_params
        # gradients, then a stop flag and the loss sum: one Allreduce carries all three
        self.reduced = np.zeros(n + 2, np.float32)
        self.net = Network(arch, params, max(max_rows, eval_rows), grads=self.reduced[:n])
        self.buckets = gradient_buckets(arch, overlap_mb * 2**20) if overlap_mb > 0 else None
        self.phase_s = [0.0, 0.0, 0.0]  # the last step's compute, allreduce (wait), optimizer
        self.optimizer = make_optimizer(opt_settings, arch.n_params)
        if opt_state is not None:
            restore_optimizer(self.optimizer, *opt_state)
        self.chunk = self.net.ws.max_rows
        self.timeline = NullTimeline()
        self.watchdog = NullWatchdog()

    @property
    def params(self):
        return self.net.params

    def warmup(self, x, y):
        self.net.warmup(x, y)
        kernels.all_finite(self.net.grads)
        if self.optimizer is not None:
            self.optimizer.warmup()

    def step(self, xb, yb, rows, scale, stop=False):
        tl = self.timeline
        n = self.arch.n_params
        start = time.perf_counter()
        if self.buckets:
            loss, correct, requests = self._backward_overlapped(xb, yb, scale, stop)
            t0 = time.perf_counter()
            self.watchdog.arrived()
            self.comm.wait_all(requests)
        else:
            if tl.enabled:
                loss, correct = self.net.train_step_traced(xb, yb, scale, tl)
            else:
                loss, correct = self.net.train_step(xb, yb, scale)
            self.reduced[n] = 1.0 if stop else 0.0
            self.reduced[n + 1] = loss
            t0 = time.perf_counter()
            self.watchdog.arrived()
            self.comm.allreduce_sum_(self.reduced)
        t1 = time.perf_counter()
        # every rank holds the same reduced buffer, so every rank decides the same
        finite = bool(np.isfinite(self.reduced[n + 1]) and kernels.all_finite(self.net.grads))
        if finite:
            self.optimizer.step(self.net.params, self.net.grads)
        t2 = time.perf_counter()
        tl.add("allreduce", t0, t1)
        tl.add("optimizer", t1, t2)
        self.phase_s = [t0 - start, t1 - t0, t2 - t1]
        return StepResult(loss, correct, rows, bool(self.reduced[n] > 0), finite)

    def _backward_overlapped(self, xb, yb, scale, stop):
        """Forward and loss, then backward one bucket of layers at a time, last layer first, each
        bucket's Iallreduce started as soon as its gradients exist (the first bucket also carries
        the stop flag and the loss). Returns (loss, correct, requests to wait for)."""
        net, ws, n = self.net, self.net.ws, self.arch.n_params
        rows = xb.shape[0]
        t0 = time.perf_counter()
        if rows:
            loss, correct = net.forward_loss_grad(xb, yb, scale)
        else:
            loss, correct = 0.0, 0
            net.grads[:] = 0
        t1 = time.perf_counter()
        self.timeline.add("forward", t0, t1)
        self.reduced[n] = 1.0 if stop else 0.0
        self.reduced[n + 1] = loss
        requests = []
        for hi, lo, a, b in self.buckets:
            if rows:
                kernels.backward_layers(net.grads, net.params, xb, ws.sizes, ws.w_off, ws.b_off,
                                        ws.acts, ws.a_off, ws.act, ws.d0, ws.d1, xb, False, hi, lo)
            requests.append(self.comm.iallreduce_sum_(self.reduced[a:b]))
        self.timeline.add("backward", t1, time.perf_counter())
        return float(loss), int(correct), requests

    def forward_chunks(self, n, read_x, consume):
        """Raw outputs for this rank's n rows, chunk by chunk: consume(offset, out)."""
        ws = self.net.ws
        for off in range(0, n, self.chunk):
            m = min(self.chunk, n - off)
            kernels.forward(self.net.params, read_x(off, m), ws.sizes, ws.w_off, ws.b_off, ws.acts,
                            ws.a_off, ws.act, ws.out_act)
            consume(off, ws.output(m))

    def full_state(self):
        return self.net.params, (self.optimizer.state if self.optimizer else [])

    def replicas_agree(self):
        lo, hi = self.comm.allreduce_minmax(zlib.crc32(self.net.params))
        return lo == hi

    def stats(self):
        return {}


def gradient_buckets(arch, bucket_bytes):
    """[(hi, lo, start, end)]: groups of whole layers, last layer first, each about bucket_bytes
    of gradients, with its contiguous slice [start, end) of the reduced buffer (the first bucket
    runs to the buffer's end, taking the stop flag and loss along)."""
    w_off, _ = arch.offsets()
    ends = list(w_off[1:]) + [arch.n_params]
    buckets, hi = [], arch.n_layers
    while hi > 0:
        lo = hi - 1
        while lo > 0 and (ends[hi - 1] - w_off[lo - 1]) * 4 <= bucket_bytes:
            lo -= 1
        end = arch.n_params + 2 if hi == arch.n_layers else int(ends[hi - 1])
        buckets.append((hi, lo, int(w_off[lo]), end))
        hi = lo
    return buckets


def make_engine(comm, grid, arch, params, max_rows, opt_settings=None, opt_state=None,
                partition=None, micro_batches=1, schedule="1f1b", eval_rows=0, overlap_mb=0.0):
    """The engine for this rank: data parallel when the grid has one stage, else a pipeline.
    max_rows: the most rows of one step on this reader; eval_rows: rows per evaluation pass
    (data parallel; a pipeline evaluates in micro-batch sized chunks)."""
    if grid.stages == 1:
        return DataParallelEngine(comm, arch, params, max_rows, opt_settings, opt_state, eval_rows,
                                  overlap_mb)
    from .pipeline import PipelineEngine
    return PipelineEngine(comm, grid, arch, params, max_rows, opt_settings, opt_state, partition,
                          micro_batches, schedule)

