"""Layer-wise pipeline engine: this rank owns consecutive layers (a stage) of the network; the
replica's part of each global batch is cut into micro-batches that flow forward stage to stage
(activations, TAG_ACTIVATION) and back (gradients, TAG_GRADIENT) over uppercase Isend/Recv on
preallocated contiguous buffers. Gradients of all micro-batches are summed, averaged over the
stage's replicas with one Allreduce, and applied once per global batch.

Every send has exactly one receive: both sides derive the same micro-batch list and schedule from
plain ints (rows of the batch, M, S). Sends are non-blocking and a slot's pending send is waited
for before that slot's buffers are written again, so no cycle of blocking sends can form.
"""
import time
import zlib

import numpy as np

from . import kernels
from .engine import Agreement, Engine, StepResult, agreed_step, make_optimizer
from .model import NO_DROPOUT, NO_ROWS, Layers, tensor_spans
from .plan import (balanced_partition, even_part, in_flight, layer_flops, parse_partition,
                   schedule, stage_layers)
from .shard import ShardedUpdate

TAG_ACTIVATION, TAG_GRADIENT = 101, 102
STAT_KEYS = ("compute_s", "wait_s", "bubble", "activation_bytes", "layers")


class Slot:
    """Buffers of one micro-batch in flight on this stage, and the send still using them."""

    def __init__(self, ws):
        self.ws, self.pending, self.h = ws, None, None
        self.drop, self.rows = NO_DROPOUT, NO_ROWS  # the forward's dropout, for its backward

    def wait(self):
        if self.pending is not None:
            self.pending.Wait()
            self.pending = None


class PipelineEngine(Engine):
    def __init__(self, comm, grid, arch, params, max_rows, opt_settings=None, opt_state=None,
                 partition=None, micro_batches=1, kind="1f1b", shard=False):
        self.comm, self.grid, self.arch = comm, grid, arch
        self.kind, self.micro = kind, int(micro_batches)
        self.wants_x, self.wants_y = grid.is_first, grid.is_last
        self.data_rank, self.data_size = grid.replica, grid.replicas
        counts = (parse_partition(partition, arch.n_layers, grid.stages) if partition
                  else balanced_partition(layer_flops(arch.sizes), grid.stages))
        self.layers_per_stage = counts
        first, end = stage_layers(counts, grid.stage)
        self.p0, self.p1 = self.param_range(grid.stage)
        self.dp = comm.split(grid.stage, grid.replica)    # this stage's replicas
        stage_state = (None if opt_state is None else
                       (opt_state[0], [b[self.p0:self.p1] for b in opt_state[1]]))
        # --shard-optimizer: this stage's replicas each update one block of its parameters
        n = self.p1 - self.p0
        spans = tensor_spans(arch.sizes[first:end + 1])  # this stage's tensors (LARS/LAMB)
        dtype = arch.float
        self.shard = (ShardedUpdate(self.dp, n, opt_settings, stage_state, spans, dtype)
                      if shard and grid.replicas > 1 and opt_settings is not None else None)
        padded = self.shard.padded if self.shard else n
        self.padded_params, self.padded_grads = np.zeros(padded, dtype), np.zeros(padded, dtype)
        self.padded_params[:n] = params[self.p0:self.p1]
        last_act = arch.output_activation if grid.is_last else arch.activation
        self.layers = Layers(arch.sizes[first:end + 1], arch.activation, last_act,
                             self.padded_params[:n], self.padded_grads[:n],
                             unit0=sum(arch.sizes[:first]), slope=arch.slope)
        self.last_hidden = not grid.is_last
        self.params, self.grads = self.layers.params, self.layers.grads
        self.micro_grads = np.zeros_like(self.params)
        self.pipe = comm.split(grid.replica, grid.stage)  # this replica's stages, rank = stage
        self.loss = arch.loss_fn
        # micro-batch rows: the largest part of this replica's share of a batch (max_rows) over M
        self.chunk = max(-(-int(max_rows) // self.micro), 1)
        n_slots = max(in_flight(kind, grid.stages, grid.stage, self.micro), 1)
        self.slots = [Slot(self.layers.workspace(self.chunk, stage_input=not grid.is_first))
                      for _ in range(n_slots)]
        self.optimizer = (self.shard.optimizer if self.shard else
                          make_optimizer(opt_settings, self.params.size, stage_state, spans,
                                         dtype=dtype))
        self.compute_s = self.wait_s = 0.0
        self.control = np.zeros(3)

    def param_range(self, stage):
        """[start, end) of a stage's parameters in the flat buffer: contiguous, as layers are."""
        first, end = stage_layers(self.layers_per_stage, stage)
        w_off, _ = self.arch.offsets()
        start = int(w_off[first])
        return start, int(w_off[end]) if end < self.arch.n_layers else self.arch.n_params

    # -- one micro-batch through this stage ------------------------------------------------------
    def _recv(self, buf, source, tag):
        t = time.perf_counter()
        self.pipe.recv_(buf, source, tag)
        t1 = time.perf_counter()
        self.wait_s += t1 - t
        self.timeline.add("wait", t, t1)

    def _wait(self, slot):
        if slot.pending is None:
            return
        t = time.perf_counter()
        slot.wait()
        t1 = time.perf_counter()
        self.wait_s += t1 - t
        self.timeline.add("wait", t, t1)

    def _forward(self, slot, n, read_x, drop=NO_DROPOUT, rows=NO_ROWS):
        """Input (read or received) -> this stage's layers -> output sent on (kept: last stage)."""
        ws, s = slot.ws, self.grid.stage
        self._wait(slot)
        if self.grid.is_first:
            h = read_x(n)
        else:
            h = ws.input(n)
            self._recv(h, s - 1, TAG_ACTIVATION)
        t = time.perf_counter()
        out = self.layers.forward(ws, h, drop, rows)
        t1 = time.perf_counter()
        self.compute_s += t1 - t
        self.timeline.add("forward", t, t1)
        slot.h, slot.drop, slot.rows = h, drop, rows
        if not self.grid.is_last:
            slot.pending = self.pipe.isend_(out, s + 1, TAG_ACTIVATION)
        return out

    def _backward(self, slot, n, accumulate):
        """Gradient at this stage's output (from the loss, or received) -> parameter gradients
        (written for the step's first micro-batch, added after that), and the gradient at the
        stage's input sent back."""
        ws, s = slot.ws, self.grid.stage
        if not self.grid.is_last:
            self._wait(slot)  # the activation send reads the buffer the gradient arrives in
            self._recv(ws.output(n), s + 1, TAG_GRADIENT)
        first = self.grid.is_first
        dx = None if first else ws.input_grad(n)
        t = time.perf_counter()
        self.layers.backward(ws, slot.h, self.micro_grads if accumulate else self.grads, dx,
                             drop=slot.drop, rows=slot.rows)
        if accumulate:
            self.grads += self.micro_grads
        t1 = time.perf_counter()
        self.compute_s += t1 - t
        self.timeline.add("backward", t, t1)
        if not first:
            slot.pending = self.pipe.isend_(dx, s - 1, TAG_GRADIENT)

    # -- engine interface -----------------------------------------------------------------------
    def warmup(self, x, y):
        """Compile the kernels this stage calls on one local row (no communication)."""
        ws = self.slots[0].ws
        dtype = self.arch.float
        h = np.zeros((1, self.layers.sizes[0]), dtype)
        out = self.layers.forward(ws, h)
        if self.grid.is_last and y is not None and len(y):
            self.loss.grad_(out, y[:1], ws.out_act, 1.0)          # evaluation's float64 scale
            self.loss.grad_(out, y[:1], ws.out_act, dtype.type(1))  # training's scale
        self.layers.backward(ws, h, self.micro_grads,
                             None if self.grid.is_first else np.zeros_like(h))
        self.micro_grads[:] = 0
        kernels.all_finite(self.grads)
        if self.dropout is not None:
            self.dropout.for_update(0)  # compile the mask key outside any timing
        if self.clip_grad_norm:
            kernels.sum_squares(self.grads[:1])
            kernels.scale_(np.zeros(1, dtype), dtype.type(1))
        if self.optimizer is not None:
            self.optimizer.warmup(dtype)

    def step(self, xb, yb, rows, scale, stop=False, ids=None, weights=None):
        """One global batch: this replica's `rows` rows in M micro-batches, then one update."""
        parts = [p for p in (even_part(rows, self.micro, i) for i in range(self.micro)) if p[1]]
        ops = schedule(self.kind, self.grid.stages, self.grid.stage, len(parts))
        if not parts:
            self.grads[:] = 0  # this replica has no rows of this batch: it adds zero weight
        backwards = 0
        loss, correct = 0.0, 0
        scale = self.params.dtype.type(scale)
        drop, ids = self.dropout_now(ids)
        for op, j in ops:
            off, n = parts[j]
            slot = self.slots[j % len(self.slots)]
            if op == "F":
                out = self._forward(slot, n, lambda m, off=off: xb[off:off + m], drop,
                                    ids[off:off + n] if len(ids) else ids)
                if self.grid.is_last:
                    t = time.perf_counter()
                    l, c = self.loss.grad_(out, yb[off:off + n], slot.ws.out_act, scale,
                                           None if weights is None else weights[off:off + n])
                    loss, correct = loss + l, correct + c
                    self.compute_s += time.perf_counter() - t
            else:
                self._backward(slot, n, accumulate=backwards > 0)
                backwards += 1
        for slot in self.slots:
            self._wait(slot)
        t0 = time.perf_counter()
        self.watchdog.arrived()
        agreed = self._reduce_gradients(loss, stop)
        t1 = time.perf_counter()
        norm = agreed_step(self, agreed, self._update)
        self.timeline.add("allreduce", t0, t1)
        self.timeline.add("optimizer", t1, time.perf_counter())
        return StepResult(float(loss), int(correct), rows if self.grid.is_last else 0,
                          agreed.stop, agreed.finite, norm)

    def _update(self, grads):
        if self.shard:
            self.shard.update(self.padded_params)
            self.shard.gather(self.padded_params)
        else:
            self.optimizer.step(self.params, self.grads)

    def _reduce_gradients(self, loss, stop):
        """Sum the stage's gradient over its replicas (all of it, or sharded: this replica's
        slice), then agree on stop and finiteness across the whole world and (clipping) sum the
        stages' squared norms. Returns the Agreement (with the gradient this rank updates with)."""
        if self.shard:
            grads = self.shard.reduce_scatter_(self.padded_grads)
            bad, squares = self.shard.block_checks(bool(self.clip_grad_norm))  # distinct blocks
            bad = bad or not np.isfinite(loss)
        else:
            grads = self.dp.allreduce_sum_(self.grads)
            bad = not (kernels.all_finite(self.grads) and np.isfinite(loss))
            # each replica holds the whole stage gradient: each adds its identical share
            squares = (kernels.sum_squares(self.grads) / self.grid.replicas
                       if self.clip_grad_norm else 0.0)
        self.control[:] = (1.0 if stop else 0.0, 1.0 if bad else 0.0, squares)
        self.comm.allreduce_(self.control)
        return Agreement(bool(self.control[0] > 0), bool(self.control[1] == 0), grads,
                         lambda: self.control[2])

    def forward_chunks(self, n, read_x, consume):
        """Forward only, this replica's n rows chunk by chunk; the last stage calls
        consume(offset, raw output). Not counted in the training-step timings."""
        timings = self.compute_s, self.wait_s
        for i, off in enumerate(range(0, n, self.chunk)):
            m = min(self.chunk, n - off)
            slot = self.slots[i % len(self.slots)]
            out = self._forward(slot, m, lambda k, off=off: read_x(off, k))
            if self.grid.is_last:
                consume(off, out)
        for slot in self.slots:
            self._wait(slot)
        self.compute_s, self.wait_s = timings

    def full_state(self):
        """Replica 0's stages gather their slices to world rank 0 (stage 0 of replica 0)."""
        opt_state = (self.shard.full_state() if self.shard else  # collective over replicas
                     self.optimizer.state if self.optimizer else [])
        if self.grid.replica != 0:
            return None, None
        counts = [b - a for a, b in (self.param_range(s) for s in range(self.grid.stages))]
        root = self.pipe.rank == 0
        full = lambda: (np.empty(self.arch.n_params, self.arch.float)  # noqa: E731
                        if root else None)
        params = self.pipe.gatherv_(self.params, full(), counts)
        state = [self.pipe.gatherv_(s, full(), counts) for s in opt_state]
        return params, state

    def replicas_agree(self):
        lo, hi = self.dp.allreduce_minmax(zlib.crc32(self.params))
        lo, hi = self.comm.allreduce_minmax(int(lo != hi))
        return hi == 0

    def stats(self):
        """This stage's time computing and waiting on communication, and its bubble fraction."""
        busy = self.compute_s + self.wait_s
        return {"stage": self.grid.stage, "compute_s": self.compute_s, "wait_s": self.wait_s,
                "bubble": self.wait_s / busy if busy else 0.0,
                "activation_bytes": sum(slot.ws.nbytes for slot in self.slots),
                "layers": self.layers_per_stage[self.grid.stage]}

    def describe(self):
        grid = self.grid
        return (f"{grid.stages} pipeline stages (layers {self.layers_per_stage}) x "
                f"{grid.replicas} replica(s), {self.micro} micro-batches, {self.kind}")

    def stage_summary(self):
        """Per-stage figures averaged over replicas, the same list on every rank (one small
        Allreduce over a stages x keys table; collective)."""
        grid, stats = self.grid, self.stats()
        table = np.zeros((grid.stages, len(STAT_KEYS)))
        table[grid.stage] = [stats[k] for k in STAT_KEYS]
        table = self.comm.allreduce_sum_(table) / grid.replicas
        return [{"stage": s, **{k: (int(v) if k in ("activation_bytes", "layers") else float(v))
                                for k, v in zip(STAT_KEYS, table[s])}}
                for s in range(grid.stages)]

    def close(self):
        """Free this engine's communicators (collective; after the last step; once)."""
        if self.shard:
            self.shard.close()
        for comm in (self.dp, self.pipe):
            comm.free()
        self.shard = self.dp = self.pipe = None
