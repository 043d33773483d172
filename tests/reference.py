"""A naive NumPy MLP and optimizers, written independently of mpinn's kernels, to test against.

Layers are a list of (W, b) with W of shape (fan_in, fan_out); everything is plain NumPy, one layer
at a time, with the chain rule spelled out. Optimizers follow PyTorch's documented update rules.
"""
import numpy as np


def act(name, z):
    if name == "relu":
        return np.maximum(z, 0)
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-z))
    return z


def act_grad(name, z):
    """d act(z) / dz, from the pre-activation z."""
    if name == "relu":
        return (z > 0).astype(z.dtype)
    if name == "tanh":
        return 1 - np.tanh(z) ** 2
    if name == "sigmoid":
        s = 1 / (1 + np.exp(-z))
        return s * (1 - s)
    return np.ones_like(z)


def forward(layers, x, activation, output_activation="identity"):
    """-> (list of pre-activations z_l, list of layer inputs h_l, final output)."""
    zs, hs = [], []
    h = x
    for i, (W, b) in enumerate(layers):
        hs.append(h)
        z = h @ W + b
        zs.append(z)
        h = act(output_activation if i == len(layers) - 1 else activation, z)
    return zs, hs, h


def loss_and_grads(layers, x, y, activation, loss, output_activation="identity", denom=None,
                   deltas=None):
    """Mean loss (PyTorch's definition) and its gradients [(dW, db)]. `denom` overrides the number
    of rows the mean divides by (a rank's part of a bigger global batch). `deltas`, a list, gets
    each layer's (input h, dLoss/dz), last layer first."""
    n = x.shape[0] if denom is None else denom
    zs, hs, out = forward(layers, x, activation, output_activation)
    if loss == "cross_entropy":
        z = zs[-1]
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        value = -np.log(p[np.arange(len(y)), y]).sum() / n
        onehot = np.zeros_like(p)
        onehot[np.arange(len(y)), y] = 1
        delta = (p - onehot) / n
    else:
        k = out.shape[1]
        value = ((out - y) ** 2).sum() / (n * k)
        delta = 2 * (out - y) / (n * k) * act_grad(output_activation, zs[-1])
    grads = [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        W, _ = layers[i]
        grads[i] = (hs[i].T @ delta, delta.sum(axis=0))
        if deltas is not None:
            deltas.append((hs[i], delta))
        if i > 0:
            delta = (delta @ W.T) * act_grad(activation, zs[i - 1])
    return value, grads


def init_layers(sizes, rng, dtype=np.float64):
    return [(rng.normal(0, 0.5, (fi, fo)).astype(dtype), rng.normal(0, 0.1, fo).astype(dtype))
            for fi, fo in zip(sizes[:-1], sizes[1:])]


def flatten(layers):
    return np.concatenate([np.concatenate([W.ravel(), b]) for W, b in layers])


def unflatten(flat, sizes):
    layers, o = [], 0
    for fi, fo in zip(sizes[:-1], sizes[1:]):
        W = flat[o:o + fi * fo].reshape(fi, fo)
        o += fi * fo
        layers.append((W, flat[o:o + fo]))
        o += fo
    return layers


class ReferenceOptimizer:
    """torch.optim.SGD (momentum, nesterov, weight_decay) and torch.optim.Adam, on flat arrays."""

    def __init__(self, name, lr, momentum=0.9, nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0):
        self.name, self.lr, self.mu, self.nesterov = name, lr, momentum, nesterov
        self.b1, self.b2, self.eps, self.wd = beta1, beta2, eps, weight_decay
        self.t, self.buf, self.m, self.v = 0, None, None, None

    def step(self, w, g):
        self.t += 1
        g = g + self.wd * w
        if self.name == "sgd":
            return w - self.lr * g
        if self.name == "momentum":
            self.buf = g.copy() if self.buf is None else self.mu * self.buf + g
            d = g + self.mu * self.buf if self.nesterov else self.buf
            return w - self.lr * d
        self.m = (1 - self.b1) * g if self.m is None else self.b1 * self.m + (1 - self.b1) * g
        self.v = (
            (1 - self.b2) * g * g if self.v is None else self.b2 * self.v + (1 - self.b2) * g * g
        )
        mhat = self.m / (1 - self.b1 ** self.t)
        vhat = self.v / (1 - self.b2 ** self.t)
        return w - self.lr * mhat / (np.sqrt(vhat) + self.eps)
