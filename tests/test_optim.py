"""Optimizers against PyTorch's update rules (reference.ReferenceOptimizer), and against torch
itself (a test dependency)."""
import numpy as np
import pytest

from mpinn.errors import UsageError
from mpinn.optim import Optimizer, Tensors
from reference import PaperTrustOptimizer, ReferenceOptimizer

CASES = [
    ("sgd", {}),
    ("sgd", {"weight_decay": 0.01}),
    ("momentum", {"momentum": 0.9}),
    ("momentum", {"momentum": 0.8, "nesterov": True, "weight_decay": 0.05}),
    ("adam", {}),
    ("adam", {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.02}),
    ("adamw", {"weight_decay": 0.1}),
    ("adamw", {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.02}),
    ("rmsprop", {}),
    ("rmsprop", {"alpha": 0.9, "eps": 1e-6, "weight_decay": 0.05}),
]


def trajectory(opt_step, w0, grads):
    w = w0.copy()
    for g in grads:
        w = opt_step(w, g)
    return w


@pytest.mark.parametrize("name,kw", CASES)
def test_matches_reference_over_steps(name, kw):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=50)
    grads = [rng.normal(size=50) for _ in range(7)]
    ours = Optimizer(name, 50, 0.05, dtype=np.float64, **kw)

    def step(w, g):
        ours.step(w, g)
        return w
    ref = ReferenceOptimizer(name, 0.05, **kw)
    np.testing.assert_allclose(trajectory(step, w0, grads), trajectory(ref.step, w0, grads),
                               rtol=1e-12, atol=1e-14)
    assert ours.t == 7


@pytest.mark.parametrize("name,kw", CASES)
def test_matches_torch(name, kw):
    import torch
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=20).astype(np.float32)
    grads = [rng.normal(size=20).astype(np.float32) for _ in range(5)]
    p = torch.nn.Parameter(torch.tensor(w0.copy()))
    if name in ("adam", "adamw"):
        rule = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        t = rule([p], lr=0.05, betas=(kw.get("beta1", 0.9), kw.get("beta2", 0.999)),
                 eps=kw.get("eps", 1e-8), weight_decay=kw.get("weight_decay", 0))
    elif name == "rmsprop":
        t = torch.optim.RMSprop([p], lr=0.05, alpha=kw.get("alpha", 0.99), eps=kw.get("eps", 1e-8),
                                weight_decay=kw.get("weight_decay", 0))
    else:
        t = torch.optim.SGD([p], lr=0.05, momentum=kw.get("momentum", 0) if name == "momentum"
                            else 0, nesterov=kw.get("nesterov", False),
                            weight_decay=kw.get("weight_decay", 0))
    w = w0.copy()
    ours = Optimizer(name, 20, 0.05, **kw)
    for g in grads:
        p.grad = torch.tensor(g)
        t.step()
        ours.step(w, g)
    np.testing.assert_allclose(w, p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown optimizer 'adagrad'"):
        Optimizer("adagrad", 3, 0.1)


def test_the_options_name_every_rule_the_optimizers_have():
    from mpinn import config, optim
    assert config.OPTIMIZERS == optim.OPTIMIZERS == tuple(config.OPTIMIZER_OPTIONS)


def test_torch_defaults_of_adamw_and_rmsprop_are_the_option_defaults():
    """The options' defaults are PyTorch's for what the two rules share with it (AdamW's weight
    decay excepted: mpinn's --weight-decay is 0 for every rule, given explicitly)."""
    import inspect

    import torch
    from mpinn.config import OptimOptions
    d = OptimOptions()
    rms = inspect.signature(torch.optim.RMSprop).parameters
    assert (d.alpha, d.eps) == (rms["alpha"].default, rms["eps"].default)
    adamw = inspect.signature(torch.optim.AdamW).parameters
    assert (d.beta1, d.beta2) == adamw["betas"].default and d.eps == adamw["eps"].default


# --- LARS and LAMB: a trust ratio per weight matrix ---------------------------------------------

SIZES = (6, 5, 3)  # W0 6x5, b0, W1 5x3, b1: the flat layout of a network


def spans(sizes):
    """[(lo, hi, adapt)] of the flat buffer: W_l adapted, b_l not."""
    out, o = [], 0
    for fi, fo in zip(sizes[:-1], sizes[1:]):
        out += [(o, o + fi * fo, True), (o + fi * fo, o + fi * fo + fo, False)]
        o += fi * fo + fo
    return out


def pieces(flat, sizes):
    return [flat[lo:hi] for lo, hi, _ in spans(sizes)]


TRUST_CASES = [
    ("lars", {}),
    ("lars", {"momentum": 0.8, "weight_decay": 0.01, "trust_coefficient": 0.02}),
    ("lars", {"trust_coefficient": 5.0, "trust_clip": 0.7}),  # the cap is reached
    ("lamb", {}),
    ("lamb", {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.05}),
    ("lamb", {"weight_decay": 0.01, "trust_clip": 0.5}),
]


@pytest.mark.parametrize("name,kw", TRUST_CASES)
def test_trust_ratio_rules_match_the_papers_equations(name, kw):
    """Against reference.PaperTrustOptimizer (float64, per tensor, written from the papers), with
    a weight matrix at zero for the ratio's zero case."""
    rng = np.random.default_rng(2)
    n = sum(hi - lo for lo, hi, _ in spans(SIZES))
    w = rng.normal(size=n)
    w[spans(SIZES)[2][0]:spans(SIZES)[2][1]] = 0.0  # W1 starts at zero: ratio 1
    grads = [rng.normal(size=n) for _ in range(6)]
    ours = Optimizer(name, n, 0.1, dtype=np.float64, tensors=Tensors.of(spans(SIZES)), **kw)
    ref = PaperTrustOptimizer(name, 0.1, **kw)
    adapt = [a for _, _, a in spans(SIZES)]
    expected = pieces(w.copy(), SIZES)  # (views of a copy: w is updated in place)
    for g in grads:
        ours.step(w, g)
        expected = ref.step(expected, pieces(g, SIZES), adapt)
    np.testing.assert_allclose(w, np.concatenate(expected), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_shards_of_a_tensor_sum_their_norms_to_the_whole_update(name):
    """Three optimizers over three blocks of one buffer (the sharded update's cut: tensors split
    between blocks, padding past the end), each in a thread of its own whose reduce_norms sums
    the three partial squares as an Allreduce would, take the steps of one over the whole."""
    import threading
    rng = np.random.default_rng(3)
    layout = spans(SIZES)
    n, ranks = layout[-1][1], 3
    block = -(-n // ranks)
    w = rng.normal(size=n)
    padded = np.zeros(ranks * block)
    padded[:n] = w
    grads = [rng.normal(size=n) for _ in range(4)]
    whole = Optimizer(name, n, 0.05, dtype=np.float64, weight_decay=0.01,
                      tensors=Tensors.of(layout))
    for g in grads:
        whole.step(w, g)
    posted, barrier = [None] * ranks, threading.Barrier(ranks)

    def rank(k):
        def allreduce(squares):
            posted[k] = squares
            barrier.wait()
            total = sum(posted)
            barrier.wait()
            return total
        opt = Optimizer(name, block, 0.05, dtype=np.float64, weight_decay=0.01,
                        tensors=Tensors.of(layout, k * block, (k + 1) * block),
                        reduce_norms=allreduce)
        for g in grads:
            gp = np.zeros(ranks * block)
            gp[:n] = g
            opt.step(padded[k * block:(k + 1) * block], gp[k * block:(k + 1) * block])
    threads = [threading.Thread(target=rank, args=(k,)) for k in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    np.testing.assert_allclose(padded[:n], w, rtol=1e-12, atol=1e-14)
    assert not padded[n:].any()


def test_tensors_of_a_block_number_the_pieces_as_the_whole():
    layout = spans(SIZES)  # 30 + 5 + 15 + 3 = 53 parameters
    t = Tensors.of(layout, 20, 40)
    assert t.lo.tolist() == [0, 10, 15] and t.hi.tolist() == [10, 15, 20]
    assert t.ids.tolist() == [0, 1, 2] and t.adapt.tolist() == [True, False, True]
    tail = Tensors.of(layout, 40, 60)  # W1's end, b1, then 7 of padding
    assert tail.ids.tolist() == [2, 3, 4] and tail.hi.tolist() == [10, 13, 20]
    assert tail.adapted.tolist() == [True, False, True, False, False]
