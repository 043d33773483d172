"""The sharded optimizer (ZeRO stage 1, Rajbhandari et al. 2020): a data-parallel rank owns one
contiguous 1/p block of the flat parameter buffer and that block's optimizer state. A step
Reduce_scatters the gradient (each rank receives the sum of its block only), updates its block, and
Allgathers the parameters: the same bytes on the wire as one Allreduce, the update's memory traffic
and optimizer state divided by p. Checkpoints hold the full state, gathered at save time, and any
world size takes its blocks of it on load.

The buffers are padded to p equal blocks (zeros past the last parameter: a zero gradient leaves a
zero parameter and zero state), so the equal-block collectives apply. Takes a communicator object
and plain buffers; no MPI import of its own.
"""
import numpy as np

from . import kernels
from .engine import make_optimizer


def padded_size(n, ranks):
    """n rounded up to a multiple of the ranks: the length of the sharded buffers."""
    return -(-int(n) // int(ranks)) * int(ranks)


class ShardedUpdate:
    """The block this rank of `comm` (a data-parallel group) updates of n parameters, held in
    buffers of padded_size(n, comm.size)."""

    def __init__(self, comm, n, opt_settings, opt_state, spans=(), dtype=np.float32):
        self.comm, self.n, self.dtype = comm, n, dtype
        self.padded = padded_size(n, comm.size)
        self.block = self.padded // comm.size
        # several ranks on each of several nodes: two levels (see reduce_scatter_), and the rank
        # with index j on its node and c among the nodes owns block j * nodes + c
        self.levels = comm.node_levels()
        if self.levels:
            node, cross = self.levels
            self.node_block = np.zeros(cross.size * self.block, dtype)
            self.off = (node.rank * cross.size + cross.rank) * self.block
        else:
            self.off = comm.rank * self.block
        self.grads = np.zeros(self.block, dtype)
        state = None
        if opt_state is not None:
            state = (opt_state[0], [self._block_of(b) for b in opt_state[1]])
        self.optimizer = make_optimizer(opt_settings, self.block, state, spans,
                                        (self.off, self.off + self.block), self._summed, dtype)

    def _summed(self, squares):
        """LARS/LAMB: the blocks' partial sums of squares, summed over the group."""
        return self.comm.allreduce_(squares, "sum")

    def close(self):
        """Free the two-level communicators (collective; a second call does nothing)."""
        if self.levels:
            for level in self.levels:
                level.free()
            self.levels = None

    def _block_of(self, full):
        out = np.zeros(self.block, self.dtype)
        piece = full[self.off:min(self.off + self.block, self.n)]
        out[:len(piece)] = piece
        return out

    def reduce_scatter_(self, padded_grads):
        """The summed gradient of this rank's block, into self.grads. On several nodes: first
        inside the node (each rank receives its node's sum of one node-block), then among the ranks
        with the same index on every node: a node's NIC carries the bytes of one Allreduce, where
        one flat Reduce_scatter + Allgather of MPICH sends up to twice that (measured: 1.5x the
        step across a 1 Gbit/s link, 2 nodes x 2 ranks)."""
        if not self.levels:
            return self.comm.reduce_scatter_block_(padded_grads, self.grads)
        node, cross = self.levels
        node.reduce_scatter_block_(padded_grads, self.node_block)
        return cross.reduce_scatter_block_(self.node_block, self.grads)

    def block_checks(self, want_squares):
        """(1 if this block holds a NaN/inf else 0, its sum of squares or 0)."""
        bad = 0.0 if kernels.all_finite(self.grads) else 1.0
        return bad, (kernels.sum_squares(self.grads) if want_squares else 0.0)

    def update(self, padded_params):
        self.optimizer.step(padded_params[self.off:self.off + self.block], self.grads)

    def gather(self, padded_params):
        """Every rank's updated block to every rank: all hold the same parameters again (on
        several nodes: among the nodes, then inside each)."""
        if not self.levels:
            return self.comm.allgather_(padded_params)
        node, cross = self.levels
        size = cross.size * self.block
        cross.allgather_(padded_params[node.rank * size:(node.rank + 1) * size])
        return node.allgather_(padded_params)

    def full_state(self):
        """The whole optimizer state, n elements each (collective over comm)."""
        out = []
        for piece in self.optimizer.state:
            full = np.zeros(self.padded, piece.dtype)
            full[self.off:self.off + self.block] = piece
            out.append(self.comm.allreduce_(full, "sum")[:self.n])  # blocks disjoint: a sum
        return out


class NodeShardedUpdate:
    """The sharded update inside a node's shared memory (`--allreduce auto` with a gradient of at
    least NODE_SHARD_BYTES): the node's ranks hold ONE copy of the parameters, in the window of
    their comm.NodeAllreduce, and each rank updates the slice it sums, with that slice's optimizer
    state only. Nothing is gathered: after a fence every rank reads the updated parameters where
    they lie. Against every rank updating all of them from the shared sum it costs one more fence
    (a node barrier) and saves (1 - 1/r) of the update's memory traffic (docs/performance.md has
    both figures). Between nodes each node holds the same
    slices, summed by the NodeAllreduce's Allreduce among same-index ranks."""

    def __init__(self, node_sum, n, params, opt_settings, opt_state, spans=()):
        self.node_sum, self.n = node_sum, n
        self.lo, self.hi = min(node_sum.lo, n), min(node_sum.hi, n)
        self.params = node_sum.params[:n]
        self.params[self.lo:self.hi] = params[self.lo:self.hi]
        state = None
        if opt_state is not None:
            state = (opt_state[0], [b[self.lo:self.hi].copy() for b in opt_state[1]])
        self.optimizer = make_optimizer(opt_settings, self.hi - self.lo, state, spans,
                                        (self.lo, self.hi), self._summed, params.dtype)
        node_sum.fence()  # every slice in place before any rank's first forward pass

    def _summed(self, squares):
        """LARS/LAMB: the slices' partial sums of squares, summed over the node (every node holds
        the same slices)."""
        return self.node_sum.node.allreduce_(squares, "sum")

    def checks(self, grads, want_squares):
        """Publish this slice's non-finite flag and sum of squares; after the fence every rank
        reads the totals: (any non-finite, sum of squares)."""
        bad = 0.0 if kernels.all_finite(grads) else 1.0
        self.node_sum.pause()
        self.node_sum.publish(bad, kernels.sum_squares(grads) if want_squares else 0.0)
        self.node_sum.fence()
        bad, squares = self.node_sum.totals()[:2]
        return bad > 0, float(squares)

    def update(self, grads):
        self.node_sum.pause()
        self.optimizer.step(self.params[self.lo:self.hi], grads)

    def full_state(self):
        """The whole optimizer state, n elements each (collective over the node)."""
        out = []
        for piece in self.optimizer.state:
            full = np.zeros(self.n, piece.dtype)
            full[self.lo:self.hi] = piece
            out.append(self.node_sum.node.allreduce_(full, "sum"))  # slices disjoint: a sum
        return out
