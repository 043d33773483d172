"""Gradient reducers: how the data-parallel ranks' gradients become one, behind one interface.

    AllreduceReducer      one in-place Allreduce (MPI's, or a node's shared memory) over the flat
                          gradient with the step's control values appended
    OverlapReducer        the same buffer summed in buckets while the backward pass still runs
    ShardedReducer        Reduce_scatter, each rank updates its block, Allgather (ZeRO stage 1)
    NodeShardedReducer    each rank of a node sums and updates one slice of one shared copy

Every reducer answers the same three questions for the engine's one tail (data_parallel.py):
`agree` sums the gradient and agrees on the step (did any rank ask to stop, is the summed
gradient finite, its squared norm when clipping) and points at the gradient this rank updates;
`update` applies the optimizer to it; `finish` makes every rank's parameters whole again (a
gather, a fence) after a step that every rank decided the same way. The control values ride in
the gradient's own collective, so a step costs no extra one.
"""
import math
import time

import numpy as np

from . import kernels
from .engine import Agreement

# values reduced after the gradient in the same buffer: a stop flag, the loss sum, and the ranks'
# gradient bounds (their sum bounds the summed gradient: below kernels.CERTAIN_FINITE it is finite
# without a pass over it)
CONTROL_VALUES = 3


class AllreduceReducer:
    """The gradient and control values summed in place over all ranks: by MPI's Allreduce, or
    through the node's shared memory (comm.NodeAllreduce: each rank's backward pass writes into
    its own slot, the node sums them, MPI between nodes)."""
    finish_phase = "optimizer"  # the timeline phase `finish` counts in

    def __init__(self, engine, node_sum=None):
        self.engine, self.node_sum = engine, node_sum
        n = engine.arch.n_params
        self.buffer = (node_sum.slot if node_sum else
                       np.zeros(n + CONTROL_VALUES, engine.arch.float))

    def begin(self):
        """Before the backward pass: this step's gradient buffer (a node alternates two sets of
        slots, so a rank ahead never overwrites what another still reads)."""
        if self.node_sum:
            self.buffer = self.node_sum.slot
            self.engine.net.use_grads(self.buffer[:self.engine.arch.n_params])

    def gradients(self, xb, yb, scale, stop, drop, w=None):
        """This rank's gradient into the buffer. -> (loss sum, correct)."""
        loss, correct, bound = self.engine.local_gradients(xb, yb, scale, drop, w)
        n = self.engine.arch.n_params
        self.buffer[n:n + CONTROL_VALUES] = (1.0 if stop else 0.0, loss, bound)
        return loss, correct

    def summed(self):
        return self.node_sum.sum_() if self.node_sum else self.engine.comm.allreduce_sum_(
            self.buffer)

    def agree(self, want_squares):
        n = self.engine.arch.n_params
        summed = self.summed()
        stops, loss_sum, bound_sum = summed[n:n + CONTROL_VALUES].tolist()
        # every rank holds the same reduced values, so every rank decides the same
        finite = math.isfinite(loss_sum) and (bound_sum < kernels.CERTAIN_FINITE
                                              or kernels.all_finite(summed[:n]))
        grads = summed[:n]  # this rank's own buffer (the node's sum is summed privately)
        return Agreement(stops > 0, finite, grads, lambda: kernels.sum_squares(grads))

    def update(self, grads):
        self.engine.optimizer.step(self.engine.net.params, grads)

    def finish(self, finite):
        pass

    def describe(self):
        if self.node_sum is None:
            return ""
        where = "each node's shared memory" + (", then MPI between nodes"
                                               if self.node_sum.cross is not None else "")
        return f" (gradients summed in {where})"


class OverlapReducer(AllreduceReducer):
    """--overlap-mb: the backward pass runs one bucket of layers at a time, last layer first, and
    each bucket's Iallreduce starts as soon as its gradients exist (the first bucket also carries
    the control values)."""

    def __init__(self, engine, buckets):
        super().__init__(engine)
        self.buckets, self.requests = buckets, []

    def gradients(self, xb, yb, scale, stop, drop, w=None):
        engine, net, n = self.engine, self.engine.net, self.engine.arch.n_params
        rows = xb.shape[0]
        t0 = time.perf_counter()
        if rows:
            loss, correct = net.forward_loss_grad(xb, yb, scale, *drop, w)
        else:
            loss, correct = 0.0, 0
            net.grads[:] = 0
        t1 = time.perf_counter()
        engine.timeline.add("forward", t0, t1)
        # no bound: the first bucket's sum starts before the earlier layers' gradients exist
        self.buffer[n:n + CONTROL_VALUES] = (1.0 if stop else 0.0, loss, np.inf)
        self.requests = []
        for hi, lo, a, b in self.buckets:
            if rows:
                net.backward(xb, hi, lo, *drop)
            self.requests.append(engine.comm.iallreduce_sum_(self.buffer[a:b]))
        engine.timeline.add("backward", t1, time.perf_counter())
        return float(loss), int(correct)

    def summed(self):
        self.engine.comm.wait_all(self.requests)
        return self.buffer


class ShardedReducer:
    """--shard-optimizer: Reduce_scatter the gradient, agree on stop/finiteness/norm in one small
    Allreduce, update this rank's block, Allgather the parameters."""
    finish_phase = "allreduce"

    def __init__(self, engine, shard):
        self.engine, self.shard = engine, shard
        self.buffer = np.zeros(max(engine.arch.n_params + CONTROL_VALUES, shard.padded),
                               engine.arch.float)
        self.control = np.zeros(4, np.float64)  # stop, loss, non-finite, squares

    def begin(self):
        pass

    def gradients(self, xb, yb, scale, stop, drop, w=None):
        loss, correct, _ = self.engine.local_gradients(xb, yb, scale, drop, w)
        self.stop, self.loss = stop, loss
        return loss, correct

    def agree(self, want_squares):
        self.shard.reduce_scatter_(self.buffer[:self.shard.padded])
        bad, squares = self.shard.block_checks(want_squares)
        self.control[:] = (1.0 if self.stop else 0.0, self.loss, bad, squares)
        self.engine.comm.allreduce_(self.control)
        finite = bool(self.control[2] == 0 and np.isfinite(self.control[1]))
        return Agreement(bool(self.control[0] > 0), finite, self.shard.grads,
                         lambda: self.control[3])

    def update(self, grads):
        self.shard.update(self.engine.padded_params)

    def finish(self, finite):
        if finite:  # every rank decided the same: all take part, or none
            self.shard.gather(self.engine.padded_params)

    def describe(self):
        return ""


class NodeShardedReducer(AllreduceReducer):
    """A large gradient on ranks that share a node: each sums its slice in the node's shared
    memory, the ranks agree on stop/finiteness/norm through the window's control row, each
    updates its slice of the shared parameters, and a fence ends the step."""

    def __init__(self, engine, node_sum, node_shard):
        super().__init__(engine, node_sum)
        self.node_shard = node_shard

    def begin(self):
        pass  # the sliced sum keeps one set of slots

    def gradients(self, xb, yb, scale, stop, drop, w=None):
        loss, correct, _ = self.engine.local_gradients(xb, yb, scale, drop, w)
        n = self.engine.arch.n_params
        self.buffer[n] = 1.0 if stop else 0.0
        self.buffer[n + 1] = loss
        return loss, correct

    def agree(self, want_squares):
        n, ns = self.engine.arch.n_params, self.node_shard
        self.node_sum.sum_slice_()
        grads = self.node_sum.result[ns.lo:ns.hi]
        bad, squares = ns.checks(grads, want_squares)
        summed = self.node_sum.result  # stop flag and loss complete after the checks' fence
        finite = not bad and bool(np.isfinite(summed[n + 1]))
        return Agreement(bool(summed[n] > 0), finite, grads, lambda: squares)

    def update(self, grads):
        self.node_shard.update(grads)  # this rank's slice: its own to change

    def finish(self, finite):
        self.node_sum.fence()  # every slice updated before any rank's next forward pass

    def describe(self):
        return super().describe()[:-1] + ", the update split among a node's ranks)"
