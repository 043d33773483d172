"""Which rows each rank owns, and that the HDF5 reads return exactly those rows."""
import h5py
import numpy as np
import pytest

from mpinn import data, plan
from mpinn.errors import UsageError

SHAPES = [(103, 10), (100, 10), (7, 7), (50, 64), (5, 3), (11, 4)]
# (rows, global batch, ranks) with at least one row of every full batch per rank (mpinn refuses
# a global batch smaller than the ranks)
SPLITS = [(n, batch, size) for n, batch in SHAPES for size in (1, 2, 3, 4) if batch >= size]


@pytest.mark.parametrize("n,batch,size", SPLITS)
def test_parts_of_every_global_batch_are_contiguous_and_cover_it(n, batch, size):
    plans = [plan.BatchPlan(n, batch, r, size) for r in range(size)]
    steps = {p.steps_per_epoch for p in plans}
    assert steps == {-(-n // batch)}  # every rank runs the same number of steps
    for p in plans:
        assert len(p.local_counts()) == p.steps_per_epoch
    starts = [0] * size
    for k in range(plans[0].steps_per_epoch):
        parts = []
        for r, p in enumerate(plans):
            c = p.local_counts()[k]
            parts.append(p.owned_rows()[starts[r]:starts[r] + c])
            starts[r] += c
        expected = np.arange(k * batch, min((k + 1) * batch, n))
        np.testing.assert_array_equal(np.concatenate(parts), expected)
        sizes = [len(q) for q in parts]
        assert max(sizes) - min(sizes) <= 1
    total = sum(p.n_local for p in plans)
    assert total == n  # no sample dropped


def test_a_rank_may_own_nothing_of_the_last_batch():
    # 10 rows, batch 4, 3 ranks: last batch has 2 rows, rank 2 owns none of it
    p = plan.BatchPlan(10, 4, 2, 3)
    assert list(p.local_counts()) == [1, 1, 0]


@pytest.mark.parametrize("n,batch,size", SPLITS)
def test_hdf5_selection_reads_exactly_the_owned_rows(tmp_path, n, batch, size):
    path = tmp_path / "d.h5"
    x = np.arange(n * 3, dtype=np.float64).reshape(n, 3)
    y = np.arange(n) % 5
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = x, y
    for r in range(size):
        p = plan.BatchPlan(n, batch, r, size)
        xr, yr = data.read_rows(str(path), data.Columns(), data.plan_selections(p), None)
        rows = p.owned_rows()
        assert xr.dtype == np.float32 and yr.dtype == np.int64
        np.testing.assert_array_equal(xr, x[rows])
        np.testing.assert_array_equal(yr, y[rows])


def test_block_selection_for_evaluation_covers_all_rows():
    got = [data.block_selections(10, r, 4)[0] for r in range(4)]
    assert [(s.start, s.stop, c) for s, c in got] == [(0, 3, 3), (3, 6, 3), (6, 8, 2), (8, 10, 2)]


def test_shuffle_is_a_seeded_permutation_of_the_rank_rows():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10)
    counts = np.array([4, 4, 2])
    take = lambda b: np.concatenate([b(k)[1].copy() for k in range(3)])  # noqa: E731
    a = take(data.EpochBatches(x, y, counts, True, 1, 0, 0))
    assert sorted(a) == list(range(10)) and list(a) != list(range(10))
    np.testing.assert_array_equal(a, take(data.EpochBatches(x, y, counts, True, 1, 0, 0)))
    assert list(a) != list(take(data.EpochBatches(x, y, counts, True, 1, 1, 0)))  # new epoch
    assert list(a) != list(take(data.EpochBatches(x, y, counts, True, 1, 0, 1)))  # other rank
    b = data.EpochBatches(x, y, counts, True, 1, 0, 0)
    xb, yb = b(0)
    np.testing.assert_array_equal(xb[:, 0], 2 * yb)  # rows stay whole
    np.testing.assert_array_equal(take(data.EpochBatches(x, y, counts, False, 1, 0, 0)), y)


def write(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
    return str(path)


def test_inspect_reports_clear_errors(tmp_path):
    cols = data.Columns()
    cases = [
        (dict(X=np.zeros((4, 2)), y=np.zeros(3, int)), "must have one entry per row"),
        (dict(X=np.zeros(4), y=np.zeros(4, int)), "must be 2-D"),
        (dict(X=np.zeros((4, 2))), "no dataset 'y'"),
        (dict(X=np.zeros((4, 2)), y=np.zeros(4)), "integer class labels"),
        (dict(X=np.zeros((0, 2)), y=np.zeros(0, int)), "empty"),
        (dict(X=np.array([[b"a"]]), y=np.zeros(1, int)), "numeric"),
    ]
    for i, (sets, message) in enumerate(cases):
        path = write(tmp_path / f"{i}.h5", **sets)
        with pytest.raises(UsageError, match=message):
            with data.open_h5(path) as f:
                data.inspect(f, path, cols)


def test_reading_rejects_nan_and_negative_labels(tmp_path):
    sel = [(slice(0, 3), 3)]
    path = write(tmp_path / "nan.h5", X=np.array([[0.0], [np.nan], [1.0]]), y=np.zeros(3, int))
    with pytest.raises(UsageError, match="NaN or inf"):
        data.read_rows(path, data.Columns(), sel, None)
    path = write(tmp_path / "neg.h5", X=np.zeros((3, 1)), y=np.array([0, -1, 2]))
    with pytest.raises(UsageError, match="negative class labels"):
        data.read_rows(path, data.Columns(), sel, None)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        data.open_h5(str(tmp_path / "nope.h5"))
    bad = tmp_path / "bad.h5"
    bad.write_text("hello")
    with pytest.raises(UsageError, match="cannot open"):
        data.open_h5(str(bad))


@pytest.mark.parametrize("n,batch,size", [(103, 10, 3), (100, 10, 4), (11, 4, 3), (7, 7, 2)])
def test_position_owners_match_the_batch_plan(n, batch, size):
    owner, local = plan.position_owners(n, batch, size)
    for r in range(size):
        rows = plan.BatchPlan(n, batch, r, size).owned_rows()
        np.testing.assert_array_equal(np.flatnonzero(owner == r), rows)
        np.testing.assert_array_equal(local[rows], np.arange(len(rows)))


class OneRank:
    """A 1-rank communicator for the global shuffle, run serially."""
    rank, size = 0, 1

    def alltoallv_(self, send, send_counts, recv, recv_counts):
        recv[...] = send


def test_global_shuffle_on_one_rank_is_the_permuted_file():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    y = np.arange(20)
    gx, gy = data.global_shuffle(OneRank(), x, y, 20, 6, 3, 1)
    perm = np.random.default_rng([3, 1, 2**31]).permutation(20)
    np.testing.assert_array_equal(gy, perm)
    np.testing.assert_array_equal(gx, x[perm])


def test_global_shuffle_is_a_new_permutation_every_epoch_and_seed():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    orders = {}
    for seed, epoch in ((0, 0), (0, 1), (0, 2), (1, 0)):
        gx, gy = data.global_shuffle(OneRank(), x, np.arange(100), 100, 8, seed, epoch)
        assert sorted(gy) == list(range(100))                      # every row once
        np.testing.assert_array_equal(gx[:, 0], 2 * gy)          # rows move whole
        orders[seed, epoch] = tuple(gy)
    assert len(set(orders.values())) == 4                          # no two alike
    assert orders[0, 0] != tuple(range(100))                       # and not the file order


class ThreadRank:
    """One rank of a world of threads: Alltoallv through shared slots and a barrier, so the
    global shuffle's exchange runs for real at several ranks in one process."""

    def __init__(self, world, rank):
        self.world, self.rank, self.size = world, rank, len(world["slots"])

    def alltoallv_(self, send, send_counts, recv, recv_counts):
        w = self.world
        w["slots"][self.rank] = (send, np.asarray(send_counts))
        w["barrier"].wait()
        off = 0
        for source in range(self.size):
            buf, counts = w["slots"][source]
            start, n = int(counts[:self.rank].sum()), int(counts[self.rank])
            assert n == recv_counts[source]
            recv[off:off + n] = buf[start:start + n]
            off += n
        w["barrier"].wait()


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("rounds", [1, 3, 16])
def test_global_shuffle_rounds_deliver_every_rank_the_permuted_rows(size, rounds):
    import threading
    n, batch, seed, epochs = 103, 10, 4, 2
    x_all = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    y_all = np.arange(n) * 10
    owner, _ = plan.position_owners(n, batch, size)
    world = {"slots": [None] * size, "barrier": threading.Barrier(size)}
    results, errors = {}, []

    def rank_main(r):
        try:
            rows = plan.BatchPlan(n, batch, r, size).owned_rows()
            shuffle = data.GlobalShuffle(ThreadRank(world, r), x_all[rows], y_all[rows], n, batch,
                                         rounds=rounds)
            results[r] = [tuple(a.copy() for a in shuffle.epoch(seed, e)) for e in range(epochs)]
        except Exception as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)
            world["barrier"].abort()
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    for e in range(epochs):
        perm = data.epoch_permutation(n, seed, e)
        for r in range(size):
            mine = perm[owner == r]  # the file rows of my positions, in step order
            gx, gy = results[r][e]
            np.testing.assert_array_equal(gy, y_all[mine])
            np.testing.assert_array_equal(gx, x_all[mine])
