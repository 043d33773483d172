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
    """torch.optim.SGD (momentum, nesterov, weight_decay), torch.optim.Adam, AdamW and RMSprop
    (momentum 0, not centred), on flat arrays."""

    def __init__(self, name, lr, momentum=0.9, nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, alpha=0.99):
        self.name, self.lr, self.mu, self.nesterov = name, lr, momentum, nesterov
        self.b1, self.b2, self.eps, self.wd, self.alpha = beta1, beta2, eps, weight_decay, alpha
        self.t, self.buf, self.m, self.v = 0, None, None, None

    def step(self, w, g):
        self.t += 1
        if self.name == "adamw":  # decoupled: the decay shrinks w, the gradient is left alone
            w = w * (1 - self.lr * self.wd)
        else:
            g = g + self.wd * w
        if self.name == "rmsprop":
            self.v = self.alpha * (0 if self.v is None else self.v) + (1 - self.alpha) * g * g
            return w - self.lr * g / (np.sqrt(self.v) + self.eps)
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


class PaperTrustOptimizer:
    """LARS (You, Gitman, Ginsburg 2017, Algorithm 1) and LAMB (You et al. 2019, Algorithm 2),
    from the papers' equations, over a list of tensors (each layer's W and b, float64); biases
    (adapt False) take no weight decay and no trust ratio (ratio 1). `clip` caps the ratio (the
    bound the LAMB paper's phi and DeepSpeed's max_coeff put on it; 0: none).

    LARS:  local = eta * ||w|| / (||g|| + wd * ||w||);  v = mu v + lr * local * (g + wd w);  w -= v
    LAMB:  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  r = m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps)
           u = r + wd w;  w -= lr * ||w|| / ||u|| * u
    A ratio whose norms include a zero is 1."""

    def __init__(self, name, lr, momentum=0.9, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 trust_coefficient=0.001, trust_clip=10.0):
        self.name, self.lr, self.mu, self.b1, self.b2 = name, lr, momentum, beta1, beta2
        self.eps, self.wd, self.eta, self.clip = eps, weight_decay, trust_coefficient, trust_clip
        self.t, self.state = 0, {}

    def _ratio(self, num, den):
        if num == 0 or den == 0:
            return 1.0
        r = num / den
        return min(r, self.clip) if self.clip > 0 else r

    def step(self, tensors, grads, adapt):
        """New tensors after one update: lists of arrays, adapt[i] says if tensor i is adapted."""
        self.t += 1
        out = []
        for i, (w, g, a) in enumerate(zip(tensors, grads, adapt)):
            wd = self.wd if a else 0.0
            if self.name == "lars":
                local = self._ratio(self.eta * np.linalg.norm(w),
                                    np.linalg.norm(g) + wd * np.linalg.norm(w)) if a else 1.0
                v = self.mu * self.state.get(i, 0.0) + self.lr * local * (g + wd * w)
                self.state[i] = v
                out.append(w - v)
            else:
                m, v = self.state.get(i, (0.0, 0.0))
                m = self.b1 * m + (1 - self.b1) * g
                v = self.b2 * v + (1 - self.b2) * g * g
                self.state[i] = (m, v)
                r = m / (1 - self.b1 ** self.t) / (np.sqrt(v / (1 - self.b2 ** self.t)) + self.eps)
                u = r + wd * w
                ratio = self._ratio(np.linalg.norm(w), np.linalg.norm(u)) if a else 1.0
                out.append(w - self.lr * ratio * u)
        return out
