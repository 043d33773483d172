"""Thread limits and the oversubscription warning."""

from mpinn.threads import oversubscription


def test_oversubscription_warning():
    assert oversubscription(2, 1, cores=2) is None
    assert "4 ranks x 1 thread(s) on this node exceed its 2 cores" in oversubscription(4, 1, cores=2)
    assert "exceed" in oversubscription(1, 4, cores=2)
