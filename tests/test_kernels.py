"""The Numba kernels against the naive NumPy reference and against finite differences."""
import itertools

import numpy as np
import pytest

from mpinn.model import NO_DROPOUT, NO_ROWS, Architecture, Network, init_params, layer_views
from reference import flatten, forward, init_layers, loss_and_grads, unflatten

ACTS = ("relu", "tanh", "sigmoid")
LOSSES = (("cross_entropy", "identity"), ("mse", "identity"), ("mse", "sigmoid"))


def problem(sizes, loss, n, rng, dtype):
    x = rng.normal(size=(n, sizes[0])).astype(dtype)
    if loss == "cross_entropy":
        y = rng.integers(0, sizes[-1], n).astype(np.int64)
    else:
        y = rng.uniform(0, 1, (n, sizes[-1])).astype(dtype)
    return x, y


def network(sizes, act, loss, out_act, flat, max_rows):
    arch = Architecture(tuple(sizes), act, out_act, loss)
    return Network(arch, flat.copy(), max_rows)


@pytest.mark.parametrize("act,loss_out", list(itertools.product(ACTS, LOSSES)))
def test_gradient_matches_finite_differences(act, loss_out):
    """float64 central differences of the global mean loss, for every activation x loss."""
    loss, out_act = loss_out
    rng = np.random.default_rng(1)
    sizes = (4, 6, 5, 3)
    x, y = problem(sizes, loss, 7, rng, np.float64)
    flat = flatten(init_layers(sizes, rng))
    net = network(sizes, act, loss, out_act, flat, 7)
    k = sizes[-1]
    scale = 1 / 7 if loss == "cross_entropy" else 1 / (7 * k)
    net.train_step(x, y, scale)
    analytic = net.grads.copy()

    def mean_loss(p):
        return network(sizes, act, loss, out_act, p, 7).loss_sums(x, y)[0] * scale

    h = 1e-6
    numeric = np.empty_like(flat)
    for i in range(flat.size):
        e = np.zeros_like(flat)
        e[i] = h
        numeric[i] = (mean_loss(flat + e) - mean_loss(flat - e)) / (2 * h)
    # central differences are only valid where no hidden pre-activation crosses ReLU's kink
    signs = [np.sign(z) for z in forward(unflatten(flat, sizes), x, act, out_act)[0][:-1]]
    for i in range(flat.size) if act == "relu" else ():
        for step in (h, -h):
            p = flat.copy()
            p[i] += step
            moved = forward(unflatten(p, sizes), x, act, out_act)[0][:-1]
            assert all((np.sign(z) == s).all() for z, s in zip(moved, signs)), (i, step)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("act,loss_out", list(itertools.product(ACTS, LOSSES)))
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 2e-4)])
def test_forward_backward_match_reference(act, loss_out, dtype, rtol):
    loss, out_act = loss_out
    rng = np.random.default_rng(2)
    sizes = (5, 8, 7, 4)
    x, y = problem(sizes, loss, 9, rng, dtype)
    layers = init_layers(sizes, rng)
    net = network(sizes, act, loss, out_act, flatten(layers).astype(dtype), 16)
    ref_loss, ref_grads = loss_and_grads(layers, x.astype(np.float64), y if loss == "cross_entropy"
                                         else y.astype(np.float64), act, loss, out_act)
    n_elems = 9 * (1 if loss == "cross_entropy" else sizes[-1])
    loss_sum, _ = net.train_step(x, y, 1 / n_elems)
    assert loss_sum / n_elems == pytest.approx(ref_loss, rel=rtol)
    np.testing.assert_allclose(net.grads, flatten(ref_grads), rtol=rtol, atol=rtol * 1e-2)
    out = net.forward(x)
    _, _, ref_out = forward(layers, x.astype(np.float64), act, out_act)
    if loss == "cross_entropy":
        e = np.exp(ref_out - ref_out.max(1, keepdims=True))
        ref_out = e / e.sum(1, keepdims=True)
    np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=rtol * 1e-2)


def test_part_of_a_batch_gives_its_share_of_the_gradient():
    """Gradients of two parts, each scaled by 1/whole, sum to the whole batch's gradient."""
    rng = np.random.default_rng(3)
    sizes = (3, 5, 4)
    x, y = problem(sizes, "cross_entropy", 10, rng, np.float64)
    flat = flatten(init_layers(sizes, rng))
    net = network(sizes, "tanh", "cross_entropy", "identity", flat, 10)
    net.train_step(x, y, 0.1)
    whole = net.grads.copy()
    net.train_step(x[:3], y[:3], 0.1)
    part = net.grads.copy()
    net.train_step(x[3:], y[3:], 0.1)
    np.testing.assert_allclose(part + net.grads, whole, rtol=1e-12)


def test_empty_part_gives_zero_gradient_and_loss():
    sizes = (3, 4, 2)
    net = network(sizes, "relu", "cross_entropy", "identity",
                  init_params(Architecture(sizes), 0), 4)
    net.grads[:] = 7
    loss, correct = net.train_step(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), 0.5)
    assert (loss, correct) == (0.0, 0)
    assert not net.grads.any()


def test_no_hidden_layer_is_logistic_regression():
    rng = np.random.default_rng(4)
    sizes = (6, 3)
    x, y = problem(sizes, "cross_entropy", 8, rng, np.float64)
    layers = init_layers(sizes, rng)
    net = network(sizes, "relu", "cross_entropy", "identity", flatten(layers), 8)
    net.train_step(x, y, 1 / 8)
    _, ref = loss_and_grads(layers, x, y, "relu", "cross_entropy")
    np.testing.assert_allclose(net.grads, flatten(ref), rtol=1e-10)


def test_views_share_memory_with_the_flat_buffer():
    arch = Architecture((3, 4, 2))
    flat = init_params(arch, 0)
    (W0, b0), (W1, b1) = layer_views(arch, flat)
    assert W0.shape == (3, 4) and b0.shape == (4,) and W1.shape == (4, 2) and b1.shape == (2,)
    W1[0, 0] = 42
    assert flat[3 * 4 + 4] == 42
    assert np.shares_memory(W0, flat) and flat.dtype == np.float32
    np.testing.assert_array_equal(unflatten(flat, arch.sizes)[1][0], W1)


def test_initialisation_is_seeded_and_scaled():
    arch = Architecture((200, 300, 10), "relu")
    a, b = init_params(arch, 5), init_params(arch, 5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, init_params(arch, 6))
    (W0, b0), (W1, _) = layer_views(arch, a)
    assert W0.std() == pytest.approx(np.sqrt(2 / 200), rel=0.05)  # He
    assert np.abs(W1).max() <= np.sqrt(6 / 310)  # Xavier-uniform output layer
    assert not b0.any()



def test_backward_in_layer_ranges_equals_the_whole():
    from mpinn import kernels
    rng = np.random.default_rng(7)
    sizes = (5, 7, 6, 4, 3)
    x, y = problem(sizes, "cross_entropy", 9, rng, np.float64)
    flat = flatten(init_layers(sizes, rng))
    whole = network(sizes, "tanh", "cross_entropy", "identity", flat, 9)
    whole.bound_rows = 9
    whole.train_step(x, y, 1 / 9)
    net = network(sizes, "tanh", "cross_entropy", "identity", flat, 9)
    ws = net.ws
    kernels.forward(net.params, x, ws.sizes, ws.w_off, ws.b_off, ws.acts, ws.pre, ws.a_off,
                    ws.act, ws.out_act, NO_DROPOUT, NO_ROWS, ws.units)
    kernels.cross_entropy_grad_(ws.output(9), y, 1 / 9, np.zeros(0, np.float32),
                                np.zeros(0, np.float32))
    for hi, lo in ((4, 3), (3, 1), (1, 0)):
        kernels.backward_layers(net.grads, net.params, x, ws.sizes, ws.w_off, ws.b_off, ws.acts,
                                ws.pre, ws.a_off, ws.act, ws.d0, ws.d1, x, False, hi, lo,
                                NO_DROPOUT, NO_ROWS, ws.units, ws.bound)
    np.testing.assert_allclose(net.grads, whole.grads, rtol=1e-12)
    assert net.grad_bound == whole.grad_bound > np.abs(whole.grads).max()


def test_gradient_buckets_cover_the_buffer_last_layer_first():
    from mpinn.data_parallel import gradient_buckets
    arch = Architecture((100, 200, 300, 50, 10))
    for bucket_bytes in (1, 100_000, 300_000, 10**9):
        buckets = gradient_buckets(arch, bucket_bytes)
        assert buckets[0][0] == arch.n_layers and buckets[-1][1] == 0
        assert buckets[0][3] == arch.n_params + 3  # the first also carries the control values
        for (_hi, lo, a, _b), (hi2, _lo2, _a2, b2) in zip(buckets, buckets[1:]):
            assert hi2 == lo and b2 == a  # contiguous, layer after layer, backwards
        assert buckets[-1][2] == 0
    assert len(gradient_buckets(arch, 1)) == arch.n_layers
    assert len(gradient_buckets(arch, 10**9)) == 1


def test_softmax_and_cross_entropy_are_stable_for_large_logits():
    """Both subtract the row maximum before exp: logits near 1000 overflow float32 otherwise."""
    from mpinn import kernels
    logits = np.array([[1000.0, 999.0, 0.0], [-5.0, 800.0, 801.0]], np.float32)
    e = np.exp(np.array([[1.0, 0.0], [0.0, 1.0]]))
    expect = np.array([[e[0, 0], e[0, 1], 0.0], [0.0, e[1, 0], e[1, 1]]])
    expect /= expect.sum(1, keepdims=True)
    probs = logits.copy()
    kernels.softmax_(probs)
    np.testing.assert_allclose(probs, expect, rtol=1e-6, atol=1e-30)
    grad = logits.copy()
    loss, correct = kernels.cross_entropy_grad_(grad, np.array([0, 1]), np.float32(1),
                                              np.zeros(0, np.float32), np.zeros(0, np.float32))
    assert loss == pytest.approx(-np.log(expect[0, 0]) - np.log(expect[1, 1]), rel=1e-6)
    assert correct == 1
    np.testing.assert_allclose(grad, expect - np.eye(3)[[0, 1]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_matches_numpy(dtype):
    from mpinn.kernels import all_finite
    rng = np.random.default_rng(9)
    big = np.finfo(dtype).max
    for n in (0, 1, 7, 1000, 4099):
        a = rng.normal(size=n).astype(dtype)
        cases = [a, np.full(n, big, dtype), np.full(n, -big, dtype)]  # sums would overflow
        for bad in (np.nan, np.inf, -np.inf):
            for where in {0, n // 2, n - 1} if n else ():
                b = a.copy()
                b[where] = bad
                cases.append(b)
        for c in cases:
            assert all_finite(c) == bool(np.isfinite(c).all()), (n, c[:3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_matches_numpy_for_every_transpose_and_refuses_strided_operands(dtype):
    from mpinn.gemm import gemm_
    rng = np.random.default_rng(11)
    for ta, tb in itertools.product([False, True], repeat=2):
        for m, n, k in ((3, 5, 7), (1, 4, 2), (6, 1, 3), (64, 33, 17), (0, 3, 2), (2, 0, 3),
                        (2, 3, 0)):
            A = rng.normal(size=(k, m) if ta else (m, k)).astype(dtype)
            B = rng.normal(size=(n, k) if tb else (k, n)).astype(dtype)
            C = np.full((m, n), np.nan, dtype)  # every element must be written (k = 0: zeros)
            gemm_(ta, A, tb, B, C)
            want = (A.T if ta else A) @ (B.T if tb else B)
            np.testing.assert_allclose(C, want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                       atol=1e-5)
    A, C = np.ones((4, 6), dtype), np.zeros((4, 4), dtype)
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm_(False, A[:, ::2], False, np.ones((3, 4), dtype), C)
    with pytest.raises(ValueError, match="shapes"):
        gemm_(False, A, False, np.ones((5, 4), dtype), C)


@pytest.mark.parametrize("scheme", ["he", "glorot"])
def test_initial_weights_follow_their_scheme(scheme):
    """--weight-init: He-normal (std sqrt(2 / fan_in)) before ReLU for "he", Glorot-uniform
    (within sqrt(6 / (fan_in + fan_out)), std bound / sqrt(3)) for every layer with "glorot", as
    scikit-learn draws them; biases 0; the same seed gives the same weights."""
    arch = Architecture((400, 300, 10), "relu")
    flat = init_params(arch, 5, scheme=scheme)
    (w0, b0), (w1, b1) = layer_views(arch, flat)
    bound0, bound1 = np.sqrt(6 / 700), np.sqrt(6 / 310)
    if scheme == "he":
        assert w0.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02) and abs(w0).max() > bound0
    else:
        assert abs(w0).max() <= bound0 and w0.std() == pytest.approx(bound0 / np.sqrt(3), rel=0.02)
    assert abs(w1).max() <= bound1 and not b0.any() and not b1.any()  # the output: Glorot in both
    np.testing.assert_array_equal(init_params(arch, 5, scheme=scheme), flat)


@pytest.mark.parametrize("act", ["relu", "tanh", "leaky_relu", "softplus", "gelu", "gelu_tanh",
                                 "silu"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_stages_give_the_whole_networks_gradient(act, p):
    """A network cut into two stages as the pipeline runs it (the second stage's dLoss/dx handed
    back into the first one's output slot), with and without dropout: the same gradient as the
    whole network. gelu, gelu_tanh and silu hand back dLoss/dh and the first stage applies act'
    with the z it kept (kernels.output_act_grad_)."""
    from mpinn.losses import LOSSES
    from mpinn.model import Dropout, Layers, offsets
    rng = np.random.default_rng(0)
    sizes, n = (4, 6, 5, 3), 7
    arch = Architecture(sizes, act, "identity", "mse")
    flat = rng.normal(0, 0.6, arch.n_params)
    x, y = rng.normal(size=(n, 4)), rng.uniform(size=(n, 3))
    rows = rng.permutation(100)[:n].astype(np.int64)
    whole = Network(arch, flat.copy(), n)
    whole.train_step(x, y, 1.0, None, Dropout(p, 3).for_update(1), rows)
    cut = int(offsets(sizes)[0][1])
    first = Layers(sizes[:2], act, act, flat[:cut].copy())
    second = Layers(sizes[1:], act, "identity", flat[cut:].copy(), unit0=sizes[0])
    ws0, ws1 = first.workspace(n), second.workspace(n, stage_input=True)
    drop0, drop1 = Dropout(p, 3, last_hidden=True).for_update(1), Dropout(p, 3).for_update(1)
    h = first.forward(ws0, x, drop0, rows).copy()
    LOSSES["mse"].grad_(second.forward(ws1, h, drop1, rows), y, ws1.out_act, 1.0)
    second.backward(ws1, h, dx=ws1.input_grad(n), drop=drop1, rows=rows)
    ws0.output(n)[:] = ws1.input_grad(n)
    first.backward(ws0, x, drop=drop0, rows=rows)
    np.testing.assert_allclose(np.concatenate([first.grads, second.grads]), whole.grads,
                               rtol=1e-12, atol=1e-15)
    assert np.abs(whole.grads[:cut]).max() > 1e-3
