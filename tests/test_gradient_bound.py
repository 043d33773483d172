"""The gradient bound (kernels.backward_layers): N * max|h_in| * max|dLoss/dz| over the layers,
which lets an engine know a gradient is finite without reading it. It must equal that formula
computed from the NumPy reference, never be below the gradient it bounds, be inf when an input is
not finite, and the engine must still refuse a gradient that overflows while the loss does not."""
import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import mpiexec, mpinn_env
from mpinn import kernels
from mpinn.model import Architecture, Dropout, Network, init_params
from mpinn.runtime.timeline import NullTimeline
from reference import flatten, init_layers, loss_and_grads

CASES = list(itertools.product(("relu", "tanh", "sigmoid"),
                               (("cross_entropy", "identity"), ("mse", "sigmoid")),
                               ((5, 3), (6, 9, 4), (7, 16, 11, 5))))


def reference_bound(layers, x, y, act, loss, out_act):
    deltas = []
    with np.errstate(divide="ignore", over="ignore"):  # exp saturates at these scales
        loss_and_grads(layers, x, y, act, loss, out_act, deltas=deltas)
    return max(len(x) * max(np.abs(h).max(), 1.0) * np.abs(d).max() for h, d in deltas)


@pytest.mark.parametrize("act, loss_out, sizes", CASES)
def test_bound_is_the_formula_and_bounds_the_gradient(act, loss_out, sizes):
    loss, out_act = loss_out
    rng = np.random.default_rng(len(sizes))
    for n, scale in ((1, 1.0), (13, 1.0), (13, 1e6)):  # 1e6: activations far above 1
        x = (scale * rng.normal(size=(n, sizes[0]))).astype(np.float64)
        y = (rng.integers(0, sizes[-1], n) if loss == "cross_entropy"
             else rng.uniform(0, 1, (n, sizes[-1])))
        layers = init_layers(sizes, rng)
        net = Network(Architecture(sizes, act, out_act, loss), flatten(layers), n)
        net.bound_rows = n  # bound even where reading the gradient would be cheaper
        net.train_step(x, y, net.loss.scale(n, sizes[-1]))
        want = reference_bound(layers, x, y, act, loss, out_act)
        assert net.grad_bound == pytest.approx(want, rel=1e-9)
        assert net.grad_bound >= np.abs(net.grads).max()


def test_bound_with_dropout_bounds_the_gradient():
    sizes = (8, 32, 32, 4)
    rng = np.random.default_rng(3)
    net = Network(Architecture(sizes, "relu"), flatten(init_layers(sizes, rng, np.float32)), 50)
    net.bound_rows = 50
    x = rng.normal(size=(50, 8)).astype(np.float32)
    drop = Dropout(0.5, seed=1).for_update(0)
    net.train_step(x, rng.integers(0, 4, 50), 1 / 50, None, drop, np.arange(50))
    assert np.abs(net.grads).max() <= net.grad_bound < kernels.CERTAIN_FINITE


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_bound_is_not_certain_when_an_input_is_not_finite(bad):
    sizes = (4, 6, 3)
    rng = np.random.default_rng(5)
    net = Network(Architecture(sizes, "relu"), flatten(init_layers(sizes, rng, np.float32)), 8)
    net.bound_rows = 8
    x = rng.normal(size=(8, 4)).astype(np.float32)
    x[3, 1] = bad
    net.train_step(x, rng.integers(0, 3, 8), 1 / 8)
    assert not net.grad_bound < kernels.CERTAIN_FINITE


def test_bound_only_where_it_reads_less_than_the_gradient():
    """Small rows x widths against the parameters: bounded; a batch past bound_rows, or the
    traced path, leaves it unknown (the engine then reads the gradient)."""
    sizes = (64, 256, 10)
    arch = Architecture(sizes)
    net = Network(arch, init_params(arch, 0), 128)
    assert net.bound_rows == arch.n_params // (2 * sum(sizes))
    x, y = np.ones((net.bound_rows, 64), np.float32), np.zeros(net.bound_rows, np.int64)
    net.train_step(x, y, 1.0)
    assert net.grad_bound < kernels.CERTAIN_FINITE
    net.train_step(np.ones((net.bound_rows + 1, 64), np.float32), np.zeros(net.bound_rows + 1,
                                                                          np.int64), 1.0)
    assert net.grad_bound == np.inf
    net.train_step(x, y, 1.0)
    net.train_step_traced(x, y, 1.0, NullTimeline())
    assert net.grad_bound == np.inf


def test_empty_part_has_a_zero_bound():
    sizes = (4, 6, 3)
    net = Network(Architecture(sizes), np.ones(Architecture(sizes).n_params, np.float32), 8)
    net.bound_rows = 8
    net.train_step(np.ones((8, 4), np.float32), np.zeros(8, np.int64), 1 / 8)
    assert net.grad_bound > 0
    net.train_step(np.ones((0, 4), np.float32), np.zeros(0, np.int64), 1 / 8)
    assert net.grad_bound == 0


# A gradient that overflows float32 while the loss does not: 4-64-1, relu, squared error; with
# x = 1e30 and first weights 1e-11 the hidden outputs are 4e19, second weights 1e-30 keep the
# output near 0, a target of 1e19 makes the loss 1e38 (finite) and dLoss/dz -2e19, so the second
# weights' gradient is 8e38 (inf in float32). The network is wide enough for the kernels to bound
# the gradient (bound_rows >= 1), so this takes the certificate's path, not only the fallback.
PROGRAM = textwrap.dedent("""
    import numpy as np
    from mpinn.comm import Comm
    from mpinn.data_parallel import DataParallelEngine
    from mpinn.model import Architecture
    comm = Comm()
    from mpinn import kernels
    from mpinn.model import layer_views
    arch = Architecture((4, 64, 1), "relu", "identity", "mse")
    params = np.zeros(arch.n_params, np.float32)
    (W0, _), (W1, _) = layer_views(arch, params)
    W0[:], W1[:] = 1e-11, 1e-30
    opt = dict(name="momentum", lr=0.1, momentum=0.9)
    for allreduce in ("auto", "mpi"):
        for target in (1e19, 1e18, 1.0):  # overflows; bound above CERTAIN_FINITE yet finite; small
            engine = DataParallelEngine(comm, arch, params.copy(), 1, opt, allreduce=allreduce)
            last = comm.rank == comm.size - 1
            assert engine.net.bound_rows >= 1
            x = np.full((1, 4), 1e30 if target > 1 and last else 1.0, np.float32)
            y = np.full((1, 1), target if last else 1.0, np.float32)
            result = engine.step(x, y, comm.size, np.float32(1.0))
            assert np.isfinite(result.loss), result.loss
            if target == 1e19:
                assert not result.finite, allreduce
                np.testing.assert_array_equal(engine.params, params)  # no update
            else:  # 1e18: a bound of 8e37 proves nothing; a pass over the gradient finds it finite
                assert result.finite and (engine.params != params).any(), allreduce
                big = engine.net.grad_bound >= kernels.CERTAIN_FINITE
                assert comm.allreduce_minmax(int(big))[1] == int(target > 1)
            assert np.isfinite(engine.params).all()
            engine.close()
    ranks_ok = comm.allreduce_(np.ones(1))[0]
    if comm.rank == 0:
        print("ok", int(ranks_ok))
""")


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_engine_refuses_a_gradient_that_overflows_under_a_finite_loss(tmp_path, ranks):
    """Through the node's shared memory and MPI's Allreduce, on the last rank's rows only."""
    (tmp_path / "prog.py").write_text(PROGRAM)
    r = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, str(tmp_path / "prog.py")],
                       capture_output=True, text=True, timeout=120, env=mpinn_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ok {ranks}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_abs_matches_numpy_and_sees_every_non_finite_value(dtype):
    rng = np.random.default_rng(4)
    big = np.finfo(dtype).max
    for shape in ((0, 3), (1, 1), (7, 5), (33, 129)):
        a = rng.normal(size=shape).astype(dtype) * 1e3
        cases = [a, -np.abs(a), np.full(shape, -big, dtype), np.full(shape, -0.0, dtype)]
        for bad in (np.nan, np.inf, -np.inf):
            for where in ({0, a.size // 2, a.size - 1} if a.size else ()):
                b = a.copy()
                b.flat[where] = bad
                cases.append(b)
        for c in cases:
            want = np.abs(c).max() if c.size else 0.0
            want = want if np.isfinite(c).all() else np.inf
            assert kernels._max_abs(c) == want, (shape, c.flat[:3])
