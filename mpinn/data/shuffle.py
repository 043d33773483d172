"""Epoch orders: a reader's own permutation (--shuffle rank) and the global shuffle, a seeded
permutation of all rows whose rows move between ranks in Alltoallv rounds (--shuffle global)."""
import numpy as np

from ..plan import position_owners


def epoch_permutation(n_rows, seed, epoch):
    """The global shuffle's order of an epoch: position p holds file row perm[p]."""
    return np.random.default_rng([seed, epoch, 2**31]).permutation(n_rows)


def rank_permutation(n, seed, epoch, rank):
    """--shuffle rank: the order of a reader's n rows in an epoch (in memory and streamed)."""
    return np.random.default_rng([seed, epoch, rank]).permutation(n)


def global_shuffle_rows(n_rows, batch, seed, epoch, rank, size):
    """The file rows this rank holds in an epoch of the global shuffle, in its step order."""
    owner, _ = position_owners(n_rows, batch, size)
    return epoch_permutation(n_rows, seed, epoch)[owner == rank]


def global_shuffle(comm, x, y, n_rows, batch, seed, epoch):
    """This rank's rows for one epoch of the global shuffle (see GlobalShuffle), fresh buffers."""
    return GlobalShuffle(comm, x, y, n_rows, batch).epoch(seed, epoch)


class GlobalShuffle:
    """This rank's rows for each epoch under a seeded permutation of all rows: position p of the
    epoch holds file row perm[p], every rank owns its usual positions, so results are the same
    for any number of ranks. x, y are the rows this rank loaded (file row f at local index
    local[f] of rank owner[f], the BatchPlan split).

    The rows move in `rounds` Alltoallv rounds, each over one slice of the epoch's positions, into
    output buffers allocated once and refilled every epoch: besides the loaded rows and those
    buffers, an exchange holds only a round's send and receive rows (about 2/rounds of a shard)
    and the epoch's permutation."""

    def __init__(self, comm, x, y, n_rows, batch, rounds=16, w=None):
        """w: the rows' own weights, exchanged with them (epoch() then gives x, y, w)."""
        self.comm, self.arrays, self.n = comm, (x, y) if w is None else (x, y, w), n_rows
        self.owner, self.local = position_owners(n_rows, batch, comm.size)
        mine = int(np.count_nonzero(self.owner == comm.rank))
        self.out = tuple(None if a is None else np.empty((mine,) + a.shape[1:], a.dtype)
                         for a in self.arrays)
        self.step = -(-n_rows // max(1, rounds))

    def epoch(self, seed, epoch):
        perm = epoch_permutation(self.n, seed, epoch)
        filled = 0
        for start in range(0, self.n, self.step):
            filled += self._round(perm, start, min(self.n, start + self.step), filled)
        return self.out

    def _round(self, perm, start, end, filled):
        """Positions start..end: send the rows I hold for them, receive mine. -> rows received."""
        rank, size = self.comm.rank, self.comm.size
        rows = perm[start:end]                 # the file row each position takes
        src = self.owner[rows]                 # the rank that holds it
        dst = self.owner[start:end]            # the rank that owns the position
        held = np.flatnonzero(src == rank)
        held = held[np.argsort(dst[held], kind="stable")]  # by destination, positions ascending
        send_rows = self.local[rows[held]]
        send_counts = np.bincount(dst[held], minlength=size)
        want = np.flatnonzero(dst == rank)     # my positions here: my next rows in step order
        recv_counts = np.bincount(src[want], minlength=size)
        place = filled + np.argsort(src[want], kind="stable")  # rows arrive grouped by source
        for a, out in zip(self.arrays, self.out):
            if a is None:
                continue
            width = int(np.prod(a.shape[1:])) if a.ndim > 1 else 1
            send = a[send_rows]
            got = np.empty((len(want),) + a.shape[1:], a.dtype)
            self.comm.alltoallv_(send.reshape(-1), send_counts * width, got.reshape(-1),
                                 recv_counts * width)
            out[place] = got
        return len(want)
