"""Optimizers with PyTorch's semantics, each one jitted pass over the flat parameter and gradient
buffers: sgd, momentum (optionally Nesterov) and adam, with L2 weight decay added to the gradient.

State lives in flat buffers the size of the parameters (`state`, a list of 0-2 arrays) plus the step
count, so the checkpoint can store it as is and a pipeline stage owns one contiguous slice of it.
"""
import math

import numpy as np
from numba import njit

from .errors import UsageError

OPTIMIZERS = ("sgd", "momentum", "adam")


# Each rule's common case (no weight decay, no Nesterov) has a loop of its own: a branch-free loop
# over a few streams vectorises and runs at memory speed, and the update of a large network is
# memory-bound (docs/performance.md, "Measurements behind the code").


@njit(cache=True)
def sgd_(params, grads, lr, weight_decay):
    if weight_decay == 0:
        for i in range(params.shape[0]):
            params[i] -= lr * grads[i]
    else:
        for i in range(params.shape[0]):
            params[i] -= lr * (grads[i] + weight_decay * params[i])


@njit(cache=True)
def momentum_(params, grads, velocity, lr, mu, weight_decay, nesterov):
    # PyTorch: v = mu*v + g (v starts at 0, so the first step gives v = g); w -= lr*(g + mu*v) if
    # Nesterov else lr*v.
    if weight_decay == 0 and not nesterov:
        for i in range(params.shape[0]):
            v = mu * velocity[i] + grads[i]
            velocity[i] = v
            params[i] -= lr * v
    elif nesterov:
        for i in range(params.shape[0]):
            g = grads[i] + weight_decay * params[i]
            v = mu * velocity[i] + g
            velocity[i] = v
            params[i] -= lr * (g + mu * v)
    else:
        for i in range(params.shape[0]):
            g = grads[i] + weight_decay * params[i]
            v = mu * velocity[i] + g
            velocity[i] = v
            params[i] -= lr * v


@njit(cache=True)
def adam_(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, bias1, bias2_sqrt):
    # PyTorch: w -= (lr / bias1) * m / (sqrt(v) / sqrt(bias2) + eps)
    step = lr / bias1
    for i in range(params.shape[0]):
        g = grads[i] + weight_decay * params[i]
        mi = beta1 * m[i] + (1 - beta1) * g
        vi = beta2 * v[i] + (1 - beta2) * g * g
        m[i] = mi
        v[i] = vi
        params[i] -= step * mi / (math.sqrt(vi) / bias2_sqrt + eps)


class Optimizer:
    """One optimizer over a flat buffer of n parameters; `step(params, grads)` updates in place,
    at the rate its schedule gives for this update (lr.Schedule), or at `lr` without one."""

    def __init__(self, name, n, lr, momentum=0.9, nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, dtype=np.float32, schedule=None):
        if name not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
        self.name, self.lr, self.momentum, self.nesterov = name, lr, momentum, nesterov
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.t = 0
        self.schedule = schedule  # update number (0 for the first) -> learning rate; None: lr
        n_state = {"sgd": 0, "momentum": 1, "adam": 2}[name]
        self.state = [np.zeros(n, dtype) for _ in range(n_state)]
        self._scalars_for, self._scalars = None, ()

    def warmup(self, dtype=np.float32):
        """Compile (or load from cache) this update rule on scratch buffers; state is untouched."""
        scratch = Optimizer(self.name, 1, self.lr, self.momentum, self.nesterov, self.beta1,
                            self.beta2, self.eps, self.weight_decay, dtype)
        scratch.step(np.zeros(1, dtype), np.zeros(1, dtype))

    def step(self, params, grads):
        if self.schedule is not None:
            self.lr = self.schedule(self.t)
        self.t += 1
        f = params.dtype.type
        key = (f, self.lr)  # the learning rate may change between steps (schedules)
        if key != self._scalars_for:  # converting costs more than a small network's update
            self._scalars_for = key
            self._scalars = tuple(f(v) for v in (self.lr, self.momentum, self.weight_decay,
                                                 self.beta1, self.beta2, self.eps))
        lr, mu, wd, beta1, beta2, eps = self._scalars
        if self.name == "sgd":
            sgd_(params, grads, lr, wd)
        elif self.name == "momentum":
            momentum_(params, grads, self.state[0], lr, mu, wd, self.nesterov)
        else:
            bias1 = 1 - self.beta1 ** self.t
            bias2_sqrt = math.sqrt(1 - self.beta2 ** self.t)
            adam_(params, grads, self.state[0], self.state[1], lr, beta1, beta2, eps, wd,
                  f(bias1), f(bias2_sqrt))
