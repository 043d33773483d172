"""Thread limits and the oversubscription warning."""

from mpinn.runtime.threads import oversubscription


def test_oversubscription_warning():
    assert oversubscription(2, 1, cores=2) is None
    assert "4 ranks x 1 thread(s) on this node exceed its 2 cores" in oversubscription(
        4, 1, cores=2
    )
    assert "exceed" in oversubscription(1, 4, cores=2)


def test_limit_reaches_every_blas_and_numba():
    import numba
    from threadpoolctl import threadpool_info

    from mpinn.runtime.threads import limit_threads
    try:
        limit_threads(2)
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
        limit_threads(1)
        pools = threadpool_info()
        assert any("scipy" in p["filepath"] for p in pools)  # the BLAS Numba's np.dot calls
        assert all(p["num_threads"] == 1 for p in pools)
        assert numba.get_num_threads() == 1
    finally:
        limit_threads(1)
