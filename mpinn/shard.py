"""The sharded optimizer (ZeRO stage 1, Rajbhandari et al. 2020): a data-parallel rank owns one
contiguous 1/p slice of the flat parameter buffer and that slice's optimizer state. A step
Reduce_scatters the gradient (each rank receives the sum of its slice only), updates its slice, and
Allgathers the parameters: the same bytes on the wire as one Allreduce, the update's memory traffic
and optimizer state divided by p. Checkpoints hold the full state, gathered at save time, and any
world size takes its slices of it on load.

Takes a communicator object and plain buffers; no MPI import of its own.
"""
import numpy as np

from . import kernels
from .engine import make_optimizer
from .plan import even_part


class ShardedUpdate:
    """The slice this rank of `comm` (a data-parallel group) updates of an n-element buffer."""

    def __init__(self, comm, n, opt_settings, opt_state):
        self.comm, self.n = comm, n
        self.counts = [even_part(n, comm.size, r)[1] for r in range(comm.size)]
        self.off, self.cnt = even_part(n, comm.size, comm.rank)
        self.grads = np.zeros(self.cnt, np.float32)
        state = None if opt_state is None else (
            opt_state[0], [b[self.off:self.off + self.cnt] for b in opt_state[1]])
        self.optimizer = make_optimizer(opt_settings, self.cnt, state)

    def reduce(self, grads):
        """The summed gradient of this rank's slice, into self.grads."""
        return self.comm.reduce_scatter_(grads, self.grads, self.counts)

    def slice_checks(self, want_squares):
        """(1 if this slice holds a NaN/inf else 0, its sum of squares or 0)."""
        bad = 0.0 if kernels.all_finite(self.grads) else 1.0
        return bad, (kernels.sum_squares(self.grads) if want_squares else 0.0)

    def update(self, params):
        self.optimizer.step(params[self.off:self.off + self.cnt], self.grads)

    def gather(self, params):
        """Every rank's updated slice to every rank: all hold the same parameters again."""
        return self.comm.allgatherv_(params, self.counts)

    def full_state(self):
        """The whole optimizer state (collective over comm; every rank gets it)."""
        out = []
        for piece in self.optimizer.state:
            full = np.zeros(self.n, piece.dtype)
            full[self.off:self.off + self.cnt] = piece
            out.append(self.comm.allgatherv_(full, self.counts))
        return out
