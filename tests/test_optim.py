"""Optimizers against PyTorch's update rules (reference.ReferenceOptimizer), and against torch
itself (a test dependency)."""
import numpy as np
import pytest

from mpinn.errors import UsageError
from mpinn.optim import Optimizer
from reference import ReferenceOptimizer

CASES = [
    ("sgd", {}),
    ("sgd", {"weight_decay": 0.01}),
    ("momentum", {"momentum": 0.9}),
    ("momentum", {"momentum": 0.8, "nesterov": True, "weight_decay": 0.05}),
    ("adam", {}),
    ("adam", {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.02}),
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
    if name == "adam":
        t = torch.optim.Adam([p], lr=0.05, betas=(kw.get("beta1", 0.9), kw.get("beta2", 0.999)),
                             eps=kw.get("eps", 1e-8), weight_decay=kw.get("weight_decay", 0))
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
    with pytest.raises(UsageError, match="unknown optimizer 'rmsprop'"):
        Optimizer("rmsprop", 3, 0.1)
