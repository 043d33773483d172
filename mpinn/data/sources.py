"""Batch sources: where the training loop's batches come from. Each is a BatchSource: for an
epoch it gives that epoch's batches, a callable k -> (inputs, targets) of this reader's part of
global batch k, with rows_of(k) (their file rows, for dropout's masks) and close().

    InMemorySource      the rows this reader loaded, in file order or its own shuffle
    GlobalShuffleSource the rows of a seeded permutation of all rows, exchanged between ranks
    StreamedSource      inputs read from the file as training goes, a chunk read ahead

The three give the same batches for the same rows, so how the data arrives never changes the
weights a run ends with.
"""
import queue
import threading
import time
from typing import Protocol

import numpy as np

from .read import RowSource, _check_finite
from .shuffle import GlobalShuffle, global_shuffle_rows, rank_permutation


class BatchSource(Protocol):
    counts: np.ndarray   # this reader's rows of each global batch of an epoch
    shuffle_seconds: float  # time spent exchanging rows (the global shuffle)
    own_weights: bool    # the rows carry their own weights (--weight-key): weights_of(k)

    def global_rows(self, k):
        """Rows of global batch k over all readers (the gradient's 1/N)."""

    def epoch(self, epoch):
        """This epoch's batches: b(k) -> (xb, yb), b.rows_of(k), b.weights_of(k),
        b.step_sums(weight_of), b.close()."""

    def first_rows(self):
        """Inputs of this reader's first step, to compile the kernels on."""


class EpochBatches:
    """This rank's batches for one epoch: step k yields its part of global batch k. Fixed order
    gives views of the local arrays; shuffled order permutes the rows this rank owns, seeded by
    (seed, epoch, rank), and gathers them into preallocated buffers."""

    def __init__(self, x, y, counts, shuffle, seed, epoch, rank, rows=None, w=None):
        """x or y may be None (a pipeline stage that does not read it): its batches are None.
        rows: the file row of each local row (for dropout's masks); `rows_of(k)` gives batch k's.
        w: each local row's own weight (--weight-key); `weights_of(k)` gives batch k's."""
        self.arrays, self.counts, self.rows, self.w = (x, y), counts, rows, w
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.perm = None
        if shuffle:
            n = int(np.sum(counts))
            self.perm = rank_permutation(n, seed, epoch, rank)
            m = int(counts.max()) if len(counts) else 0
            self.buffers = tuple(None if a is None else np.empty((m,) + a.shape[1:], a.dtype)
                                 for a in self.arrays)

    def rows_of(self, k):
        """The file rows of this rank's part of batch k, in the order __call__ gives them."""
        if self.rows is None:
            return None
        s, c = int(self.starts[k]), int(self.counts[k])
        return self.rows[s:s + c] if self.perm is None else self.rows[self.perm[s:s + c]]

    def close(self):
        pass

    def weights_of(self, k):
        """The own weights of this rank's rows of batch k, in the order __call__ gives them."""
        if self.w is None:
            return None
        s, c = int(self.starts[k]), int(self.counts[k])
        return self.w[s:s + c] if self.perm is None else self.w[self.perm[s:s + c]]

    def step_sums(self, weight_of):
        """The sum of the row weights (weight_of(labels), the loss's, times the rows' own) over
        this rank's rows of each step (zeros where it holds no labels): what a weighted loss
        divides by, once summed over ranks."""
        y = self.arrays[1]
        if y is None:
            return np.zeros(len(self.counts))
        w = _row_weights(weight_of(y), self.w, len(y))
        return _sums_by_step(w if self.perm is None else w[self.perm], self.counts)

    def __call__(self, k):
        s, c = int(self.starts[k]), int(self.counts[k])
        if self.perm is None:
            return tuple(None if a is None else a[s:s + c] for a in self.arrays)
        idx = self.perm[s:s + c]
        out = []
        for a, buf in zip(self.arrays, self.buffers):
            if a is not None:
                np.take(a, idx, axis=0, out=buf[:c])
            out.append(None if a is None else buf[:c])
        return tuple(out)


class StreamedBatches:
    """This rank's batches for one epoch read from the file as training goes: the epoch's file
    rows in step order are cut into chunks of whole steps (at most chunk_rows rows), and a
    background thread reads the next chunk while the current one trains. At most three chunks are
    in memory (the one training, one read ahead, one being read). Labels come from `labels` (all
    of the file's, kept in memory: they are small). Gives what EpochBatches gives for the same
    rows, so streamed training ends with the same weights as training from memory."""

    def __init__(self, path, cols, labels, file_rows, counts, chunk_rows, with_rows,
                 scale_=None, weights=None):
        """cols: read.Columns (the inputs' key; the rows of a split, which "file rows" here
        count in; a table's label and weight columns)."""
        self.path, self.cols, self.labels, self.file_rows = path, cols, labels, file_rows
        self.weights = weights  # all rows' own weights (--weight-key), like the labels
        self.counts, self.with_rows = counts, with_rows
        self.scale_ = scale_  # the inputs' scaling (in place), applied to each chunk as it is read
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.chunks = []  # (first step, first row, end row)
        step = 0
        while step < len(counts):
            first, rows = step, 0
            while step < len(counts) and (step == first or rows + counts[step] <= chunk_rows):
                rows += int(counts[step])
                step += 1
            self.chunks.append((first, int(self.starts[first]), int(self.starts[first]) + rows))
        self.chunk_of_step = np.repeat(np.arange(len(self.chunks)),
                                       np.diff([c[0] for c in self.chunks] + [len(counts)]))
        self.queue, self.thread, self.current, self.stopped = (
            queue.Queue(maxsize=1),
            None,
            None,
            False,
        )

    def _read_ahead(self, first_chunk):
        source = None
        try:
            source = RowSource(self.path, self.cols.x_key, self.cols.rows, self.cols)
            for j in range(first_chunk, len(self.chunks)):
                if self.stopped:
                    return
                _, a, b = self.chunks[j]
                rows = self.file_rows[a:b]
                x = source.read(rows)
                _check_finite(self.path, source.X, self.cols.x_key, x,
                              lambda rows=rows: source.X[np.sort(source.file_rows_of(rows))])
                if self.scale_ is not None:
                    self.scale_(x)
                self.queue.put((j, x, None))
        except Exception as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self.queue.put((None, None, e))
        finally:
            if source is not None:
                source.close()

    def _chunk(self, j):
        if self.current is not None and self.current[0] == j:
            return self.current[1]
        if self.thread is None:
            self.thread = threading.Thread(target=self._read_ahead, args=(j,), daemon=True,
                                           name="mpinn-read-ahead")
            self.thread.start()
        got, x, error = self.queue.get()
        if error is not None:
            raise error
        assert got == j, "streamed batches are taken in step order"
        self.current = (j, x)
        return x

    def rows_of(self, k):
        if not self.with_rows:
            return None
        s, c = int(self.starts[k]), int(self.counts[k])
        return self.file_rows[s:s + c]

    def weights_of(self, k):
        if self.weights is None:
            return None
        s, c = int(self.starts[k]), int(self.counts[k])
        return self.weights[self.file_rows[s:s + c]]

    def step_sums(self, weight_of):
        rows = self.file_rows
        w = _row_weights(weight_of(self.labels[rows]),
                         None if self.weights is None else self.weights[rows], len(rows))
        return _sums_by_step(w, self.counts)

    def __call__(self, k):
        s, c = int(self.starts[k]), int(self.counts[k])
        j = int(self.chunk_of_step[k])
        x = self._chunk(j)
        off = s - self.chunks[j][1]
        return x[off:off + c], self.labels[self.file_rows[s:s + c]]

    def close(self):
        """Stop the read-ahead (an epoch ended early: a signal, early stopping, --steps)."""
        self.stopped = True
        if self.thread is not None:
            while self.thread.is_alive():
                try:
                    self.queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self.thread.join()


def _row_weights(of_labels, own, n):
    """Each row's weight: the loss's for its label times its own, either of them absent (None)."""
    w = np.ones(n) if of_labels is None else np.asarray(of_labels, np.float64)
    return w if own is None else w * own


def _sums_by_step(weights, counts):
    """Sums of consecutive runs of `counts` weights (a step's rows follow the last step's)."""
    steps = np.repeat(np.arange(len(counts)), counts)
    return np.bincount(steps, weights=weights, minlength=len(counts)).astype(np.float64)


class PlannedSource:
    """What every source shares: this reader's part of each global batch, from its BatchPlan."""

    own_weights = False  # set where the rows carry their own weights (on every rank)

    def __init__(self, plan):
        self.plan, self.counts = plan, plan.local_counts()
        self.global_rows = plan.global_batch_rows
        self.shuffle_seconds = 0.0


class InMemorySource(PlannedSource):
    """The rows this reader loaded: file order, or its own permutation of them every epoch."""

    def __init__(self, x, y, plan, shuffle, seed, owned_rows=None, w=None):
        super().__init__(plan)
        self.x, self.y, self.shuffle, self.seed, self.owned_rows = x, y, shuffle, seed, owned_rows
        self.w = w

    def epoch(self, epoch):
        return EpochBatches(self.x, self.y, self.counts, self.shuffle, self.seed, epoch,
                            self.plan.rank, self.owned_rows, self.w)

    def first_rows(self):
        return self.x


class GlobalShuffleSource(PlannedSource):
    """A seeded permutation of all rows every epoch, the rows exchanged between ranks (made at the
    first epoch, with its buffers): results independent of the number of ranks."""

    def __init__(self, comm, x, y, plan, seed, with_rows, w=None):
        super().__init__(plan)
        self.comm, self.x, self.y, self.seed, self.with_rows = comm, x, y, seed, with_rows
        self.w, self.exchange = w, None

    def epoch(self, epoch):
        t0 = time.perf_counter()
        plan = self.plan
        if self.exchange is None:
            self.exchange = GlobalShuffle(self.comm, self.x, self.y, plan.n_rows, plan.batch,
                                          w=self.w)
        ex, ey, *ew = self.exchange.epoch(self.seed, epoch)
        rows = global_shuffle_rows(plan.n_rows, plan.batch, self.seed, epoch, self.comm.rank,
                                   self.comm.size) if self.with_rows else None
        self.shuffle_seconds += time.perf_counter() - t0
        return EpochBatches(ex, ey, self.counts, False, self.seed, epoch, self.comm.rank, rows,
                            ew[0] if ew else None)

    def first_rows(self):
        return self.x


class StreamedSource(PlannedSource):
    """Training inputs read from the file as training goes (this reader's slice is larger than its
    memory budget), in the order the in-memory sources would give (the file rows of an epoch from
    epoch_file_rows): the rows of one chunk at a time read ahead, all of the file's labels (small)
    in memory."""

    def __init__(self, path, cols, chunk_rows, labels, plan, shuffle, seed, with_rows,
                 scale_=None, weights=None):
        super().__init__(plan)
        self.weights = weights
        self.path, self.cols, self.chunk_rows, self.labels = path, cols, chunk_rows, labels
        self.epoch_rows = epoch_file_rows(shuffle, plan, seed)
        self.with_rows, self.scale_ = with_rows, scale_

    def epoch(self, epoch):
        return StreamedBatches(self.path, self.cols, self.labels, self.epoch_rows(epoch),
                               self.counts, self.chunk_rows, self.with_rows, self.scale_,
                               self.weights)

    def first_rows(self):
        source = RowSource(self.path, self.cols.x_key, self.cols.rows, self.cols)
        try:
            return source.read(self.plan.owned_rows()[:max(1, int(self.counts[0]))])
        finally:
            source.close()


def epoch_file_rows(shuffle, plan, seed):
    """epoch -> the file rows of this reader's steps in that epoch, in order: what the in-memory
    sources gather (EpochBatches' per-rank permutation, the global shuffle's positions)."""
    rank, size = plan.rank, plan.size
    if shuffle == "global":
        return lambda epoch: global_shuffle_rows(plan.n_rows, plan.batch, seed, epoch, rank, size)
    owned = plan.owned_rows()
    if shuffle == "rank":
        return lambda epoch: owned[rank_permutation(len(owned), seed, epoch, rank)]
    return lambda epoch: owned
