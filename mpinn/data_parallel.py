"""The data-parallel engine: every rank holds the whole network, computes the gradient of its part
of the global batch in one fused kernel call, and one in-place Allreduce over the flat gradient
buffer (plus a stop flag, the loss and a gradient bound, so signals and non-finite checks cost no
extra collective) makes every rank's gradient the global one. Every rank then applies the same
update.

With --overlap-mb the backward pass runs one bucket of layers at a time, last layer first, and each
bucket's Iallreduce starts as soon as its gradients exist.
"""
import math
import time
import zlib

import numpy as np

from . import kernels
from .engine import Engine, StepResult, clip_, make_optimizer
from .model import Network
from .plan import even_part
from .shard import NodeShardedUpdate, ShardedUpdate

# from this gradient size on, the ranks of a node split the update of one shared copy of the
# parameters: it saves more update traffic than the extra node barrier (~2 us) costs
NODE_SHARD_BYTES = 256 * 1024

# values reduced after the gradient in the same buffer: a stop flag, the loss sum, and the ranks'
# gradient bounds (their sum bounds the summed gradient: below kernels.CERTAIN_FINITE it is finite
# without a pass over it)
CONTROL_VALUES = 3


class DataParallelEngine(Engine):
    def __init__(self, comm, arch, params, max_rows, opt_settings=None, opt_state=None,
                 eval_rows=0, overlap_mb=0.0, accumulate=1, shard=False, allreduce="auto"):
        self.comm, self.arch = comm, arch
        self.data_rank, self.data_size = comm.rank, comm.size
        n = arch.n_params
        # --shard-optimizer: this rank updates one block (shard.py); 1 rank has nothing to share
        self.shard = (ShardedUpdate(comm, n, opt_settings, opt_state)
                      if shard and comm.size > 1 and opt_settings is not None else None)
        padded = self.shard.padded if self.shard else n
        # ranks that share a node sum through its shared memory (comm.NodeAllreduce): the backward
        # pass writes into this rank's slot; a large gradient's sum and update are split among
        # them, on one shared copy of the parameters
        on_node = (allreduce == "auto" and not self.shard and overlap_mb <= 0
                   and opt_settings is not None)
        share = on_node and 4 * n >= NODE_SHARD_BYTES
        self.node_sum = comm.node_allreduce(n + CONTROL_VALUES, shared_params=share) if on_node else None
        self.node_shard = (NodeShardedUpdate(self.node_sum, n, params, opt_settings, opt_state)
                           if self.node_sum and share else None)
        # gradients, then the control values: one Allreduce carries them all (sharded: the
        # gradient padded to equal blocks, control values apart)
        self.reduced = (self.node_sum.slot if self.node_sum else
                        np.zeros(max(n + CONTROL_VALUES, padded), np.float32))
        # this rank's parameters, unless the node shares one copy of them in its window
        self.padded_params = None if self.node_shard else np.zeros(padded, np.float32)
        if self.padded_params is not None:
            self.padded_params[:n] = params
        self.accumulate = int(accumulate)
        piece = -(-int(max_rows) // self.accumulate)  # the workspace holds one piece of a share
        self.net = Network(arch, self.node_shard.params if self.node_shard else
                           self.padded_params[:n], max(piece, eval_rows), grads=self.reduced[:n])
        self.piece_grads = np.zeros(n, np.float32) if self.accumulate > 1 else None
        self.buckets = gradient_buckets(arch, overlap_mb * 2**20) if overlap_mb > 0 else None
        self.phase_s = [0.0, 0.0, 0.0]  # the last step's compute, allreduce (wait), optimizer
        self.optimizer = (self.shard.optimizer if self.shard else self.node_shard.optimizer
                          if self.node_shard else make_optimizer(opt_settings, n, opt_state))
        self.control = np.zeros(4, np.float64)  # sharded: stop, loss, non-finite, squares
        self.chunk = self.net.ws.max_rows

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
            kernels.scale_(np.zeros(1, np.float32), np.float32(1))
        if self.optimizer is not None:
            self.optimizer.warmup()

    def step(self, xb, yb, rows, scale, stop=False, ids=None):
        n = self.arch.n_params
        start = time.perf_counter()
        if self.node_sum and not self.node_sum.sliced:  # this step's set of the node's slots
            self.reduced = self.node_sum.slot
            self.net.use_grads(self.reduced[:n])
        drop = self.dropout_now(ids)
        if self.buckets:
            loss, correct, requests = self._backward_overlapped(xb, yb, scale, stop, drop)
            t0 = time.perf_counter()
            self.watchdog.arrived()
            self.comm.wait_all(requests)
            summed = self.reduced
        else:
            if self.accumulate > 1:
                loss, correct, bound = self._accumulated(xb, yb, scale, drop)
            else:
                if self.timeline.enabled:
                    loss, correct = self.net.train_step_traced(xb, yb, scale, self.timeline, *drop)
                else:
                    loss, correct = self.net.train_step(xb, yb, scale, None, *drop)
                bound = self.net.grad_bound
            if self.shard:
                return self._sharded_update(loss, correct, rows, stop, start)
            if self.node_shard:
                return self._node_sharded_update(loss, correct, rows, stop, start)
            reduced = self.reduced
            reduced[n], reduced[n + 1], reduced[n + 2] = (1.0 if stop else 0.0), loss, bound
            t0 = time.perf_counter()
            self.watchdog.arrived()
            summed = self._sum()
        t1 = time.perf_counter()
        stops, loss_sum, bound_sum = summed[n:n + CONTROL_VALUES].tolist()
        # every rank holds the same reduced values, so every rank decides the same
        finite = math.isfinite(loss_sum) and (bound_sum < kernels.CERTAIN_FINITE
                                              or kernels.all_finite(summed[:n]))
        norm = 0.0
        if finite:
            grads = summed[:n]  # this rank's own buffer (the node's sum is summed privately)
            if self.clip_grad_norm:
                norm = math.sqrt(kernels.sum_squares(grads))
                clip_(grads, norm, self.clip_grad_norm)
            self.optimizer.step(self.net.params, grads)
        t2 = time.perf_counter()
        self.timeline.add("allreduce", t0, t1)
        self.timeline.add("optimizer", t1, t2)
        self.phase_s = [t0 - start, t1 - t0, t2 - t1]
        return StepResult(loss, correct, rows, stops > 0, finite, norm)

    def _sum(self):
        """The gradient and control values summed over all ranks: through the node's shared
        memory into this rank's own buffer, or in place by MPI's Allreduce."""
        if self.node_sum:
            return self.node_sum.sum_()
        return self.comm.allreduce_sum_(self.reduced)

    def reduction(self):
        if self.node_sum is None:
            return ""
        where = "each node's shared memory" + (", then MPI between nodes"
                                               if self.node_sum.cross is not None else "")
        split = ", the update split among a node's ranks" if self.node_shard else ""
        return f" (gradients summed in {where}{split})"

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

    def _sharded_update(self, loss, correct, rows, stop, start):
        """Reduce_scatter the gradient, agree on stop/finiteness/norm in one small Allreduce,
        update this rank's slice, Allgather the parameters."""
        t0 = time.perf_counter()
        self.watchdog.arrived()
        self.shard.reduce_scatter_(self.reduced[:self.shard.padded])
        bad, squares = self.shard.block_checks(bool(self.clip_grad_norm))
        self.control[:] = (1.0 if stop else 0.0, loss, bad, squares)
        self.comm.allreduce_(self.control)
        t1 = time.perf_counter()
        finite = bool(self.control[2] == 0 and np.isfinite(self.control[1]))
        norm = 0.0
        if finite:
            if self.clip_grad_norm:
                norm = math.sqrt(self.control[3])
                clip_(self.shard.grads, norm, self.clip_grad_norm)
            self.shard.update(self.padded_params)
        t2 = time.perf_counter()
        if finite:  # every rank decided the same: all take part, or none
            self.shard.gather(self.padded_params)
        t3 = time.perf_counter()
        self.timeline.add("allreduce", t0, t1)
        self.timeline.add("optimizer", t1, t2)
        self.timeline.add("allreduce", t2, t3)
        self.phase_s = [t0 - start, (t1 - t0) + (t3 - t2), t2 - t1]
        return StepResult(loss, correct, rows, bool(self.control[0] > 0), finite, norm)

    def _node_sharded_update(self, loss, correct, rows, stop, start):
        """Sum this rank's slice in the node's shared memory, agree on stop/finiteness/norm
        through the window's control row, update the slice of the shared parameters, fence."""
        n, ns = self.arch.n_params, self.node_shard
        self.reduced[n] = 1.0 if stop else 0.0
        self.reduced[n + 1] = loss
        t0 = time.perf_counter()
        self.watchdog.arrived()
        self.node_sum.sum_slice_()
        grads = self.node_sum.result[ns.lo:ns.hi]
        bad, squares = ns.checks(grads, bool(self.clip_grad_norm))
        summed = self.node_sum.result  # stop flag and loss complete after the checks' fence
        t1 = time.perf_counter()
        finite = not bad and bool(np.isfinite(summed[n + 1]))
        norm = 0.0
        if finite:
            if self.clip_grad_norm:
                norm = math.sqrt(squares)
                clip_(grads, norm, self.clip_grad_norm)  # this rank's slice: its own to change
            ns.update(grads)
        self.node_sum.fence()  # every slice updated before any rank's next forward pass
        t2 = time.perf_counter()
        self.timeline.add("allreduce", t0, t1)
        self.timeline.add("optimizer", t1, t2)
        self.phase_s = [t0 - start, t1 - t0, t2 - t1]
        return StepResult(loss, correct, rows, bool(summed[n] > 0), finite, norm)

    def _accumulated(self, xb, yb, scale, drop):
        """This rank's share in `accumulate` pieces: the first piece's gradient is written, the
        others' are added. Returns (loss sum, correct, gradient bound) over the share."""
        loss, correct, bound = 0.0, 0, 0.0
        mask, ids = drop
        for i in range(self.accumulate):
            off, m = even_part(xb.shape[0], self.accumulate, i)
            target = self.net.grads if i == 0 else self.piece_grads
            l, c = self.net.train_step(xb[off:off + m], yb[off:off + m], scale, target, mask,
                                       ids[off:off + m] if len(ids) else ids)
            if i:
                self.net.grads += self.piece_grads
            loss, correct, bound = loss + l, correct + c, bound + self.net.grad_bound
        return loss, correct, bound

    def _backward_overlapped(self, xb, yb, scale, stop, drop):
        """Forward and loss, then backward one bucket of layers at a time, last layer first, each
        bucket's Iallreduce started as soon as its gradients exist (the first bucket also carries
        the control values). Returns (loss, correct, requests to wait for)."""
        net, n = self.net, self.arch.n_params
        rows = xb.shape[0]
        t0 = time.perf_counter()
        if rows:
            loss, correct = net.forward_loss_grad(xb, yb, scale, *drop)
        else:
            loss, correct = 0.0, 0
            net.grads[:] = 0
        t1 = time.perf_counter()
        self.timeline.add("forward", t0, t1)
        # no bound: the first bucket's sum starts before the earlier layers' gradients exist
        self.reduced[n:n + CONTROL_VALUES] = (1.0 if stop else 0.0, loss, np.inf)
        requests = []
        for hi, lo, a, b in self.buckets:
            if rows:
                net.backward(xb, hi, lo, *drop)
            requests.append(self.comm.iallreduce_sum_(self.reduced[a:b]))
        self.timeline.add("backward", t1, time.perf_counter())
        return float(loss), int(correct), requests

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
