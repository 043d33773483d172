"""Pipeline planning (pure): partitions, the stage x replica grid, and schedules that cannot
deadlock, checked by simulating every stage's blocking receives."""
import pytest

from mpinn.errors import UsageError
from mpinn.plan import (Grid, balanced_partition, ideal_bubble, in_flight, layer_flops,
                        parse_partition, schedule, stage_layers)


def simulate(kind, stages, micro):
    """Run all stages' op lists with non-blocking sends and blocking receives; return the peak
    number of micro-batches each stage held. Fails if the stages stop before finishing."""
    ops = [schedule(kind, stages, s, micro) for s in range(stages)]
    pos = [0] * stages
    acts = set()   # (stage, j): activation of j sent by stage-1 to stage
    grads = set()  # (stage, j): gradient of j sent by stage+1 to stage
    held = [set() for _ in range(stages)]
    peak = [0] * stages
    progress = True
    while progress:
        progress = False
        for s in range(stages):
            if pos[s] == len(ops[s]):
                continue
            op, j = ops[s][pos[s]]
            if op == "F" and (s == 0 or (s, j) in acts):
                if s + 1 < stages:
                    acts.add((s + 1, j))
                held[s].add(j)
            elif op == "B" and (s == stages - 1 or (s, j) in grads):
                assert j in held[s], "backward before forward"
                held[s].discard(j)
                if s > 0:
                    grads.add((s - 1, j))
            else:
                continue
            peak[s] = max(peak[s], len(held[s]))
            pos[s] += 1
            progress = True
    assert pos == [len(o) for o in ops], f"deadlock: {kind} S={stages} M={micro} at {pos}"
    return peak


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("micro", [0, 1, 2, 3, 4, 8, 13])
def test_schedules_complete_and_bound_activations(kind, stages, micro):
    for s in range(stages):
        ops = schedule(kind, stages, s, micro)
        assert sorted(ops) == sorted(
            [("F", j) for j in range(micro)] + [("B", j) for j in range(micro)]
        )
    peak = simulate(kind, stages, micro)
    for s in range(stages):
        assert peak[s] <= in_flight(kind, stages, s, micro)
        if kind == "1f1b":
            assert peak[s] <= min(stages - s, micro)
        else:
            assert peak[s] == micro


def test_1f1b_order_on_a_middle_stage():
    assert schedule("1f1b", 4, 1, 4) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1),
                                         ("B", 2), ("B", 3)]
    assert schedule("gpipe", 2, 0, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


def test_balanced_partition_minimises_the_largest_stage():
    assert balanced_partition([1, 1, 1, 1], 2) == [2, 2]
    assert balanced_partition([10, 1, 1, 1], 2) == [1, 3]
    assert balanced_partition([4, 1, 1, 4], 3) == [1, 2, 1]  # the only split with max 4
    costs = layer_flops((784, 512, 512, 10))
    assert costs == [4 * 784 * 512, 6 * 512 * 512, 6 * 512 * 10]
    assert balanced_partition(costs, 2) == [1, 2]
    with pytest.raises(UsageError, match="exceeds the network's 3 layers"):
        balanced_partition(costs, 4)


def test_partition_option():
    assert parse_partition("2,1", 3, 2) == [2, 1]
    assert stage_layers([2, 1, 3], 1) == (2, 3) and stage_layers([2, 1, 3], 2) == (3, 6)
    for bad in ("2,2", "3", "0,3", "a,b"):
        with pytest.raises(UsageError, match="--partition"):
            parse_partition(bad, 3, 2)


def test_grid():
    g = Grid(2, 8, 5)
    assert (g.replicas, g.stage, g.replica, g.is_first, g.is_last) == (4, 1, 2, False, True)
    with pytest.raises(UsageError, match="does not divide the 6 ranks"):
        Grid(4, 6, 0)


def test_ideal_bubble():
    assert ideal_bubble(2, 1) == 0.5 and ideal_bubble(2, 8) == pytest.approx(1 / 9)
    assert ideal_bubble(1, 4) == 0
