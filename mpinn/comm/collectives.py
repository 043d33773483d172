"""Plain collectives: the Comm every other module is handed, over mpi4py's uppercase, buffer-based
calls (no pickling), with the recurring idioms named (bcast_int, bcast_json, allreduce_minmax,
on_root). Below this package rank and size are plain ints; `Comm()` outside mpiexec is a 1-rank
world, so all code runs serially too."""
import json
import time
import zlib

import mpi4py
import numpy as np

from . import node
from .agreement import Agreement
from .mpi import MPI, library_version


class Comm(Agreement):
    """A communicator: plain collectives over numpy buffers, the node's layout, and (Agreement)
    how a phase that may fail on some ranks only ends on every rank together."""

    def __init__(self, mpi_comm=None):
        self._comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self.is_root = self.rank == 0
        self.debug = False  # cli sets it: --debug adds tracebacks to checked errors
        self.shm_sharers = 1  # groups of ranks that each make a shared window on a node (sweep)

    def allreduce_sum_(self, buf):
        """In-place sum of a contiguous numpy buffer over all ranks."""
        return self.allreduce_(buf, "sum")

    def allreduce_(self, buf, op="sum"):
        """In-place reduction of a contiguous numpy buffer: op is "sum", "max" or "min"."""
        if self.size > 1:
            mpi_op = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
            self._comm.Allreduce(MPI.IN_PLACE, buf, op=mpi_op)
        return buf

    def iallreduce_sum_(self, buf):
        """Start an in-place sum of a contiguous buffer; returns the request (None on 1 rank)."""
        if self.size == 1:
            return None
        return self._comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    @staticmethod
    def wait_all(requests):
        MPI.Request.Waitall([r for r in requests if r is not None])

    def allreduce_sum(self, values):
        """Sum of a few float64 values over ranks (metrics)."""
        return self.allreduce_sum_(np.array(values, np.float64))

    def allreduce_minmax(self, value):
        """(min, max) of one int64 value over ranks, in one call."""
        buf = np.array([-int(value), int(value)], np.int64)
        if self.size > 1:
            self._comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        return -int(buf[0]), int(buf[1])

    def allgather_ints(self, values):
        """Every rank's int64 values, concatenated in rank order, on every rank (set-up only)."""
        values = np.ascontiguousarray(values, np.int64)
        if self.size == 1:
            return values.copy()
        counts = np.zeros(self.size, np.int64)
        counts[self.rank] = values.size
        self.allreduce_(counts)
        out = np.empty(int(counts.sum()), np.int64)
        self._comm.Allgatherv(values, [out, (counts.tolist(), None)])
        return out

    def bcast_(self, buf, root=0):
        """Broadcast a contiguous numpy buffer from root, in place."""
        if self.size > 1:
            self._comm.Bcast(buf, root=root)
        return buf

    def any_rank(self, flag):
        """True on every rank when flag is true on some rank."""
        return self.allreduce_minmax(int(bool(flag)))[1] == 1

    def every_rank(self, flag):
        """True on every rank when flag is true on every rank."""
        return self.allreduce_minmax(int(bool(flag)))[0] == 1

    def bcast_int(self, value, root=0):
        """root's integer, on every rank."""
        return int(self.bcast_(np.array([value], np.int64), root)[0])

    def bcast_json(self, obj, root=0):
        """Broadcast a JSON-serialisable object (set-up only): length, then UTF-8 bytes."""
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if self.rank == root else None
        n = self.bcast_(np.array([0 if data is None else data.size], np.int64), root)[0]
        buf = data.copy() if data is not None else np.empty(n, np.uint8)
        self.bcast_(buf, root)
        return json.loads(buf.tobytes().decode())

    def gather_json(self, obj, root=0):
        """Every rank's JSON-serialisable obj, in rank order, on root (None elsewhere; set-up and
        reports only)."""
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
        if self.size == 1:
            return [obj]
        counts = self.allgather_ints([data.size])
        out = np.empty(int(counts.sum()) if self.rank == root else 0, np.uint8)
        self.gatherv_(data, out, counts.tolist(), root)
        if self.rank != root:
            return None
        ends = np.cumsum(counts)
        return [json.loads(out[e - c:e].tobytes().decode()) for c, e in zip(counts, ends)]

    @staticmethod
    def build_info():
        """The MPI library and mpi4py as this process sees them (doctor)."""
        levels = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
                  MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
        config = mpi4py.get_config()
        return {"library": " ".join(MPI.Get_library_version().strip().splitlines()[0].split()),
                "standard": "%d.%d" % MPI.Get_version(), "mpi4py": mpi4py.__version__,
                "mpi4py_built_with": config.get("mpicc") or config.get("mpild") or "",
                "thread_level": levels.get(MPI.Query_thread(), "unknown"),
                "processor": MPI.Get_processor_name()}

    def dup(self):
        """A communicator of the same ranks whose messages never mix with this one's."""
        return Comm(self._comm.Dup())

    @staticmethod
    def threads_supported():
        """True when MPI was initialised with MPI_THREAD_MULTIPLE (threads may call MPI)."""
        return MPI.Query_thread() == MPI.THREAD_MULTIPLE

    def send_ints_(self, values, dest, tag):
        self._comm.Send(np.asarray(values, np.int64), dest=dest, tag=tag)

    def poll_ints(self, n, tag):
        """A waiting message of n int64 from any rank with this tag, or None (never blocks)."""
        message = self.poll_ints_from(n, tag)
        return None if message is None else message[1]

    def poll_ints_from(self, n, tag):
        """(source rank, n int64) of a waiting message with this tag, or None (never blocks)."""
        status = MPI.Status()
        if not self._comm.Iprobe(source=MPI.ANY_SOURCE, tag=tag, status=status):
            return None
        buf = np.empty(n, np.int64)
        self._comm.Recv(buf, source=status.Get_source(), tag=tag)
        return status.Get_source(), buf

    def recv_ints_idle(self, n, source, tag, poll_s=0.002):
        """n int64 from source, waiting with short sleeps instead of MPI's busy polling (a rank
        that waits for long must leave its core to the ranks that work)."""
        buf = np.empty(n, np.int64)
        request = self._comm.Irecv(buf, source=source, tag=tag)
        while not request.Test():
            time.sleep(poll_s)
        return buf

    def barrier_idle(self, poll_s=0.05):
        """A barrier that sleeps while it waits (ranks done early wait for the others' work)."""
        if self.size == 1:
            return
        request = self._comm.Ibarrier()
        while not request.Test():
            time.sleep(poll_s)

    def split(self, color, key):
        """Sub-communicator of the ranks with the same color, ordered by key."""
        return Comm(self._comm.Split(color, key))

    def isend_(self, buf, dest, tag):
        """Start sending a contiguous buffer; returns the request (.Wait() before reusing buf)."""
        return self._comm.Isend(buf, dest=dest, tag=tag)

    def recv_(self, buf, source, tag):
        """Receive into a preallocated contiguous buffer of exactly the sent size."""
        self._comm.Recv(buf, source=source, tag=tag)

    def alltoallv_(self, sendbuf, send_counts, recvbuf, recv_counts):
        """Rank r sends send_counts[d] consecutive elements of sendbuf to each rank d and receives
        recv_counts[s] from each s, in rank order, into recvbuf (both contiguous, one dtype)."""
        if self.size == 1:
            recvbuf[...] = sendbuf
            return recvbuf
        displ = lambda c: np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64)  # noqa: E731
        self._comm.Alltoallv(
            [sendbuf, (list(map(int, send_counts)), list(map(int, displ(send_counts))))],
            [recvbuf, (list(map(int, recv_counts)), list(map(int, displ(recv_counts))))],
        )
        return recvbuf

    def reduce_scatter_block_(self, sendbuf, recvbuf):
        """Sum sendbuf (size x recvbuf.size elements) over ranks; rank r receives block r. The
        equal-block call, not the counts one: with its partner Allgather it is the faster pair
        (docs/performance.md, "Measurements behind the code")."""
        if self.size == 1:
            recvbuf[...] = sendbuf[:recvbuf.size]
            return recvbuf
        self._comm.Reduce_scatter_block(sendbuf, recvbuf, op=MPI.SUM)
        return recvbuf

    def allgather_(self, buf):
        """In place: rank r's block r of buf (size equal blocks) goes to every rank."""
        if self.size > 1:
            self._comm.Allgather(MPI.IN_PLACE, buf)
        return buf

    def gatherv_(self, sendbuf, recvbuf, counts, root=0):
        """Concatenate every rank's sendbuf (counts[r] elements each) into recvbuf on root."""
        if self.size == 1:
            recvbuf[...] = sendbuf
            return recvbuf
        recv = [recvbuf, (list(counts), None)] if self.rank == root else None
        self._comm.Gatherv(sendbuf, recv, root=root)
        return recvbuf

    def node_size(self):
        """How many ranks of this communicator share this rank's node (shared-memory domain)."""
        return self._node()[1]

    def machine_size(self):
        """How many ranks of this communicator run on this rank's kernel (same boot id): more than
        node_size() where "nodes" are containers or network namespaces sharing one machine's
        cores."""
        try:
            with open("/proc/sys/kernel/random/boot_id") as fh:
                boot = zlib.crc32(fh.read().strip().encode())
        except OSError:
            return self.node_size()
        if self.size == 1:
            return 1
        return int(np.count_nonzero(self.allgather_ints([boot]) == boot))

    def node_rank(self):
        """This rank's index among the ranks on its node."""
        return self._node()[0]

    def _node(self):
        if self.size == 1:
            return 0, 1
        if not hasattr(self, "_node_cached"):
            local = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
            self._node_cached = (local.Get_rank(), local.Get_size())
            local.Free()
        return self._node_cached

    def _node_split(self):
        """(this node's ranks as a Comm, True when every node holds the same number of ranks, more
        than one, and the ranks span more than this node). Collective."""
        local = Comm(self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank))
        small, large = self.allreduce_minmax(local.size)
        return local, small == large and local.size > 1

    def groups_on_node(self, color):
        """How many distinct colors (groups of a split by color) the ranks on this rank's node
        hold. Collective."""
        if self.size == 1:
            return 1
        local, _ = self._node_split()
        try:
            return len(set(local.allgather_ints([color]).tolist()))
        finally:
            local.free()

    def free(self):
        """Free the MPI communicator (not COMM_WORLD). Collective over it."""
        if self._comm != MPI.COMM_WORLD and self._comm != MPI.COMM_NULL:
            self._comm.Free()

    def node_levels(self):
        """(node, cross) communicators when the ranks sit on several nodes, the same number (more
        than one) on each: node = this node's ranks, cross = the ranks with this rank's index on
        every node; else None. Collective."""
        if self.size == 1:
            return None
        local, even = self._node_split()
        if not even or local.size == self.size:  # the same on every rank
            local._comm.Free()
            return None
        return local, self.split(local.rank, self.rank)

    def node_allreduce(self, n, shared_params=False, dtype=np.float32):
        """A NodeAllreduce of n numbers (dtype) over this communicator when its ranks share nodes,
        the same number on each, and /dev/shm has room for it on every node; else None.
        Collective.

        Room: /dev/shm must have twice the window free for every group of ranks that will make
        one on this node (`shm_sharers`, set by a sweep), and then the window's pages are
        allocated at once (NodeAllreduce.populated): a node whose /dev/shm filled up meanwhile
        (another job) makes every rank fall back to MPI's Allreduce, where touching a page that
        tmpfs cannot back would have killed the job with SIGBUS."""
        if self.size == 1:
            return None
        local, even = self._node_split()
        rows = local.size + 2 if shared_params else 2 * local.size
        need = (2 * rows * (n + node.NodeAllreduce.ALIGN) * np.dtype(dtype).itemsize
                * self.shm_sharers)  # half free
        if not even or not self.every_rank(node.shm_free_bytes() >= need):
            local._comm.Free()
            return None
        cross = self.split(local.rank, self.rank) if local.size < self.size else None
        node_sum = node.NodeAllreduce(local, cross, n, shared_params, dtype)
        if not self.every_rank(node_sum.populated):
            node_sum.close()
            return None
        return node_sum

    def in_cache_order(self, fn):
        """Run fn (which compiles into Numba's cache) in three turns with barriers between: world
        rank 0; the first rank of every other node; the rest. Ranks that compile into one cache
        must not race to write it (numba #10128): a cache on a file system all nodes share is
        written once, by rank 0, and a node-local cache once per node."""
        node_first = self.node_rank() == 0  # collective the first time: every rank asks
        turn = 0 if self.rank == 0 else 1 if node_first else 2
        for t in range(3):
            if t == turn:
                fn()
            if self.size > 1:
                self.barrier()

    @staticmethod
    def library_version():
        """The MPI library's name and version, e.g. 'MPICH Version: 5.0.2'."""
        return library_version()

    def barrier(self):
        self._comm.Barrier()
