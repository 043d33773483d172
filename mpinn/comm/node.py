"""The node shared-memory sum: ranks that share a node add their gradients through one shared
window (NodeAllreduce), with the checks that keep it from killing a job (/dev/shm room, pages
allocated up front)."""
import ctypes
import errno
import os
import time

import numpy as np

from .mpi import MPI


def shm_free_bytes():
    """Free bytes in /dev/shm, where MPICH backs shared windows (unbounded where it is absent)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def slow_rank_pause(node_rank):
    """Test-only (MPINN_TEST_SLOW_RANK="R:SECONDS"): seconds that rank R of a node sleeps at
    NodeAllreduce.pause(), the points where a rank that ran ahead without waiting for the others
    would read or overwrite what they still use. Makes a missing fence show in every run, not
    only when the scheduler happens to delay a rank there."""
    spec = os.environ.get("MPINN_TEST_SLOW_RANK", "")
    if not spec:
        return 0.0
    rank, seconds = spec.split(":")
    return float(seconds) if int(rank) == node_rank else 0.0


MADV_POPULATE_WRITE = 23  # Linux 5.14+: allocate pages now; fails instead of a later SIGBUS


def populate(address, size):
    """Allocate the pages of a shared window now. MPICH maps the window from /dev/shm and the
    kernel allocates a page when it is first touched: with /dev/shm full, that touch is a SIGBUS
    that kills the rank with no word. madvise(MADV_POPULATE_WRITE) allocates them up front and
    returns an error instead. False when they cannot all be had; True too on a kernel without
    the call (EINVAL: older than 5.14), where the free-space check is all there is."""
    if size == 0:
        return True
    page = os.sysconf("SC_PAGE_SIZE")
    start = address - address % page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(start, address + size - start, MADV_POPULATE_WRITE) == 0:
        return True
    return ctypes.get_errno() == errno.EINVAL


class NodeAllreduce:
    """An in-place sum over all ranks through the shared memory of each node: every rank writes
    its values into its own slot of one shared window (the backward pass writes its gradient
    there directly), and after a node barrier reads them all. Two layouts:

    - whole (small n): each rank sums every slot itself, in rank order, into its own buffer (the
      same bits on every rank); the slots alternate between two sets step by step, so a rank that
      runs ahead writes the other set while a slower one still reads: one barrier per sum. On
      several nodes each rank then Allreduces its sum with the same-index ranks of other nodes.
    - sliced (shared_params, large n): each rank sums one slice of every slot into a shared result
      (and Allreduces that slice between nodes); the window also holds ONE copy of n parameters
      for the node, each rank updating the slice it summed (shard.NodeShardedUpdate), and a
      control row where ranks publish figures of their slice.

    Stores become visible to the other ranks at fence() (the MPI-3 shared-memory pattern: Win_sync,
    barrier, Win_sync). Its times against MPI's Allreduce are in docs/performance.md."""
    ALIGN = 16  # floats: slots and slices start on 64-byte lines
    CONTROL = 4  # float64 figures each rank publishes

    def __init__(self, node, cross, n, shared_params=False, dtype=np.float32):
        self.node, self.cross, self.n, self.sliced = node, cross, n, shared_params
        p, r = node.size, node.rank
        stride = -(-n // self.ALIGN) * self.ALIGN
        rows = p + 2 if shared_params else 2 * p
        table_bytes = rows * stride * np.dtype(dtype).itemsize
        size = table_bytes + p * self.CONTROL * 8
        self._win = MPI.Win.Allocate_shared(size if r == 0 else 0, 1, comm=node._comm)
        memory, _ = self._win.Shared_query(0)
        table = np.ndarray(buffer=memory, dtype=dtype, shape=(rows, stride))
        self.control = np.ndarray(buffer=memory, dtype=np.float64, shape=(p, self.CONTROL),
                                  offset=table_bytes)
        lines = stride // self.ALIGN
        self.lo, self.hi = (min(n, self.ALIGN * (lines * k // p)) for k in (r, r + 1))
        self.parity = 0
        if shared_params:
            self.sets, self.result, self.params = [table[:p, :n]], table[p, :n], table[p + 1]
        else:
            self.sets, self.total = [table[:p, :n], table[p:, :n]], np.zeros(n, dtype)
        self._win.Lock_all(MPI.MODE_NOCHECK)
        # the node's first rank allocates every page now (the others map the same pages)
        self.populated = populate(MPI.memory(memory).address, size) if r == 0 else True
        self._pause_s = slow_rank_pause(r)

    def pause(self):
        """Nothing, except under MPINN_TEST_SLOW_RANK (see slow_rank_pause)."""
        if self._pause_s:
            time.sleep(self._pause_s)

    @property
    def slot(self):
        """This rank's slot for the next sum: write it, then call sum_ (or sum_slice_)."""
        return self.sets[self.parity][self.node.rank]

    def fence(self):
        """Every rank's stores are visible to every other (the MPI-3 shared-memory pattern)."""
        self._win.Sync()
        self.node._comm.Barrier()
        self._win.Sync()

    def sum_slice_(self):
        """Sliced: after a fence, this rank's slice of the sum over all ranks, in
        self.result[lo:hi] (returned); the other slices are not yet complete."""
        self.fence()
        self.pause()
        lo, hi, slots = self.lo, self.hi, self.sets[0]
        out = self.result[lo:hi]
        np.add(slots[0, lo:hi], slots[1, lo:hi], out=out)
        for k in range(2, self.node.size):
            np.add(out, slots[k, lo:hi], out=out)
        if self.cross is not None:
            self.cross.allreduce_(out)
        return out

    def sum_(self):
        """The sum of every rank's slot over all ranks: whole, in this rank's own buffer; sliced,
        in the shared result (returned)."""
        if self.sliced:
            self.sum_slice_()
            self.fence()
            return self.result
        self.fence()
        self.pause()
        slots = self.sets[self.parity]
        np.add(slots[0], slots[1], out=self.total)
        for k in range(2, self.node.size):
            np.add(self.total, slots[k], out=self.total)
        if self.cross is not None:
            self.cross.allreduce_(self.total)
        self.parity ^= 1
        return self.total

    def publish(self, *figures):
        """Figures of this rank's slice, summed over the node by totals() after a fence (on
        several nodes each node holds the same slices' figures: the node's totals are the
        world's)."""
        self.control[self.node.rank, :len(figures)] = figures

    def totals(self):
        return self.control.sum(axis=0)

    def close(self):
        """Free the window and the communicators made for it (collective over the node and
        the cross-node group); a second call does nothing."""
        if self._win is None:
            return
        self._win.Unlock_all()
        self._win.Free()
        self._win = None
        self.node.free()
        if self.cross is not None:
            self.cross.free()
