"""The data-parallel engine: every rank holds the whole network, computes the gradient of its part
of the global batch in one fused kernel call, and its gradient reducer (reducers.py: one in-place
Allreduce over the flat gradient buffer plus a stop flag, the loss and a gradient bound, so
signals and non-finite checks cost no extra collective; or bucketed, sharded, or in a node's
shared memory) makes every rank's gradient the global one. Every rank then applies the same
update.
"""
import time
import zlib

import numpy as np

from . import kernels
from .engine import Engine, StepResult, agreed_step, make_optimizer
from .model import Network, tensor_spans
from .plan import even_part
from .reducers import (CONTROL_VALUES, AllreduceReducer, NodeShardedReducer, OverlapReducer,
                       ShardedReducer)
from .shard import NodeShardedUpdate, ShardedUpdate

# from this gradient size on, the ranks of a node split the update of one shared copy of the
# parameters: it saves more update traffic than the extra node barrier costs (docs/performance.md)
NODE_SHARD_BYTES = 256 * 1024



class DataParallelEngine(Engine):
    def __init__(self, comm, arch, params, max_rows, opt_settings=None, opt_state=None,
                 eval_rows=0, overlap_mb=0.0, accumulate=1, shard=False, allreduce="auto"):
        self.comm, self.arch = comm, arch
        self.data_rank, self.data_size = comm.rank, comm.size
        n = arch.n_params
        # --shard-optimizer: this rank updates one block (shard.py); 1 rank has nothing to share
        spans = tensor_spans(arch.sizes)  # where LARS/LAMB find each weight matrix
        dtype = arch.float
        self.shard = (ShardedUpdate(comm, n, opt_settings, opt_state, spans, dtype)
                      if shard and comm.size > 1 and opt_settings is not None else None)
        padded = self.shard.padded if self.shard else n
        # ranks that share a node sum through its shared memory (comm.NodeAllreduce): the backward
        # pass writes into this rank's slot; a large gradient's sum and update are split among
        # them, on one shared copy of the parameters
        on_node = (allreduce == "auto" and not self.shard and overlap_mb <= 0
                   and opt_settings is not None)
        share = on_node and arch.float.itemsize * n >= NODE_SHARD_BYTES
        self.node_sum = (
            comm.node_allreduce(n + CONTROL_VALUES, shared_params=share, dtype=dtype)
            if on_node else None
        )
        self.node_shard = (NodeShardedUpdate(self.node_sum, n, params, opt_settings, opt_state,
                                             spans)
                           if self.node_sum and share else None)
        self.reducer = self._reducer(overlap_mb)
        # this rank's parameters, unless the node shares one copy of them in its window
        self.padded_params = None if self.node_shard else np.zeros(padded, dtype)
        if self.padded_params is not None:
            self.padded_params[:n] = params
        self.accumulate = int(accumulate)
        piece = -(-int(max_rows) // self.accumulate)  # the workspace holds one piece of a share
        self.net = Network(arch, self.node_shard.params if self.node_shard else
                           self.padded_params[:n], max(piece, eval_rows),
                           grads=self.reducer.buffer[:n])
        self.piece_grads = np.zeros(n, dtype) if self.accumulate > 1 else None
        self.phase_s = [0.0, 0.0, 0.0]  # the last step's compute, allreduce (wait), optimizer
        self.optimizer = (self.shard.optimizer if self.shard else self.node_shard.optimizer
                          if self.node_shard else make_optimizer(opt_settings, n, opt_state,
                                                                 spans, dtype=dtype))
        self.chunk = self.net.ws.max_rows

    def _reducer(self, overlap_mb):
        """How this engine's gradients are summed: chosen once, here."""
        if self.shard:
            return ShardedReducer(self, self.shard)
        if self.node_shard:
            return NodeShardedReducer(self, self.node_sum, self.node_shard)
        if overlap_mb > 0:
            return OverlapReducer(self, gradient_buckets(self.arch, overlap_mb * 2**20))
        return AllreduceReducer(self, self.node_sum)

    @property
    def params(self):
        return self.net.params

    def warmup(self, x, y):
        self.net.warmup(x, y)
        kernels.all_finite(self.net.grads)
        if self.dropout is not None:
            self.dropout.for_update(0)  # compile the mask key outside any timing
        if self.clip_grad_norm:
            kernels.sum_squares(self.net.grads[:1])
            kernels.scale_(np.zeros(1, self.arch.float), self.arch.float.type(1))
        if self.optimizer is not None:
            self.optimizer.warmup(self.arch.float)

    def step(self, xb, yb, rows, scale, stop=False, ids=None, weights=None):
        """This rank's gradient, the reducer's agreement, then (when finite) clip and update:
        the one tail of every reducer. weights: the rows' own (--weight-key), or None."""
        reducer = self.reducer
        start = time.perf_counter()
        reducer.begin()
        loss, correct = reducer.gradients(xb, yb, scale, stop, self.dropout_now(ids), weights)
        t0 = time.perf_counter()
        self.watchdog.arrived()
        agreed = reducer.agree(bool(self.clip_grad_norm))
        t1 = time.perf_counter()
        norm = agreed_step(self, agreed, reducer.update)
        t2 = time.perf_counter()
        reducer.finish(agreed.finite)
        t3 = time.perf_counter()
        self.timeline.add("allreduce", t0, t1)
        if reducer.finish_phase == "allreduce":  # the sharded update's Allgather
            self.timeline.add("optimizer", t1, t2)
            self.timeline.add("allreduce", t2, t3)
            self.phase_s = [t0 - start, (t1 - t0) + (t3 - t2), t2 - t1]
        else:
            self.timeline.add("optimizer", t1, t3)
            self.phase_s = [t0 - start, t1 - t0, t3 - t1]
        return StepResult(loss, correct, rows, agreed.stop, agreed.finite, norm)

    def local_gradients(self, xb, yb, scale, drop, w=None):
        """This rank's gradient into the network's gradient buffer (rows weighted by w when
        given). -> (loss sum, correct, gradient bound)."""
        if self.accumulate > 1:
            return self._accumulated(xb, yb, scale, drop, w)
        if self.timeline.enabled:
            loss, correct = self.net.train_step_traced(xb, yb, scale, self.timeline, *drop, w)
        else:
            loss, correct = self.net.train_step(xb, yb, scale, None, *drop, w)
        return loss, correct, self.net.grad_bound

    def describe(self):
        return "data parallel" + self.reducer.describe()

    def close(self):
        """Release the shared window (collective; after the last step). The parameters are
        copied out first: the network stays usable for forward passes."""
        if self.node_sum:
            params = self.net.params.copy()
            self.net = Network(self.arch, params, self.net.ws.max_rows)
            self.node_sum.close()
            self.node_sum = self.node_shard = None
        if self.shard:
            self.shard.close()

    def _accumulated(self, xb, yb, scale, drop, w):
        """This rank's share in `accumulate` pieces: the first piece's gradient is written, the
        others' are added. Returns (loss sum, correct, gradient bound) over the share."""
        loss, correct, bound = 0.0, 0, 0.0
        mask, ids = drop
        for i in range(self.accumulate):
            off, m = even_part(xb.shape[0], self.accumulate, i)
            target = self.net.grads if i == 0 else self.piece_grads
            l, c = self.net.train_step(xb[off:off + m], yb[off:off + m], scale, target, mask,
                                       ids[off:off + m] if len(ids) else ids,
                                       None if w is None else w[off:off + m])
            if i:
                self.net.grads += self.piece_grads
            loss, correct, bound = loss + l, correct + c, bound + self.net.grad_bound
        return loss, correct, bound

    def forward_chunks(self, n, read_x, consume):
        for off in range(0, n, self.chunk):
            m = min(self.chunk, n - off)
            consume(off, self.net.raw_outputs(read_x(off, m)))

    def full_state(self):
        if self.shard:  # collective: every rank gathers the slices of the state
            return self.net.params, self.shard.full_state()
        if self.node_shard:  # collective over the node; the shared parameters copied out
            return self.net.params.copy(), self.node_shard.full_state()
        return self.net.params, (self.optimizer.state if self.optimizer else [])

    def replicas_agree(self):
        lo, hi = self.comm.allreduce_minmax(zlib.crc32(self.net.params))
        return lo == hi


def gradient_buckets(arch, bucket_bytes):
    """[(hi, lo, start, end)]: groups of whole layers, last layer first, each about bucket_bytes
    of gradients, with its contiguous slice [start, end) of the reduced buffer (the first bucket
    runs to the buffer's end, taking the control values along)."""
    w_off, _ = arch.offsets()
    ends = list(w_off[1:]) + [arch.n_params]
    buckets, hi = [], arch.n_layers
    while hi > 0:
        lo = hi - 1
        while lo > 0 and (ends[hi - 1] - w_off[lo - 1]) * 4 <= bucket_bytes:
            lo -= 1
        end = arch.n_params + CONTROL_VALUES if hi == arch.n_layers else int(ends[hi - 1])
        buckets.append((hi, lo, int(w_off[lo]), end))
        hi = lo
    return buckets
