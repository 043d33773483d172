"""Optimizers over the flat parameter and gradient buffers, each a jitted pass or two:

    sgd, momentum (optionally Nesterov), adam, rmsprop   PyTorch's rules, L2 weight decay added to
                                                         the gradient
    adamw                                                PyTorch's AdamW: decoupled weight decay
    lars, lamb                                           a trust ratio per weight matrix (You et
                                                         al. 2017, 2019): for large batches

State lives in flat buffers the size of the parameters (`state`, a list of 0-2 arrays) plus the step
count, so the checkpoint can store it as is and a pipeline stage owns one contiguous slice of it.

LARS and LAMB scale each weight matrix's update by a ratio of norms over the whole matrix; biases
(and, later, normalisation parameters) are left out of the ratio and of weight decay, as the
papers' implementations do. `Tensors` says where the matrices lie in this optimizer's buffer; a
buffer that holds part of a matrix (a shard) passes its partial sums of squares to `reduce_norms`,
which sums them over the ranks that hold the rest: one small collective per step.
"""
import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from .errors import UsageError

# each rule and its state buffers (config.py names the same rules and the options each reads)
STATE_BUFFERS = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2, "rmsprop": 1, "lamb": 2,
                 "lars": 1}
OPTIMIZERS = tuple(STATE_BUFFERS)


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


@njit(cache=True)
def adamw_(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, bias1, bias2_sqrt):
    # PyTorch's AdamW: w *= 1 - lr*wd, then Adam's step without decay in the gradient
    step, keep = lr / bias1, 1 - lr * weight_decay
    for i in range(params.shape[0]):
        g = grads[i]
        mi = beta1 * m[i] + (1 - beta1) * g
        vi = beta2 * v[i] + (1 - beta2) * g * g
        m[i] = mi
        v[i] = vi
        params[i] = params[i] * keep - step * mi / (math.sqrt(vi) / bias2_sqrt + eps)


@njit(cache=True)
def rmsprop_(params, grads, v, lr, alpha, eps, weight_decay):
    # PyTorch's RMSprop (no momentum, not centred): v = alpha*v + (1-alpha)*g^2; w -= lr*g/(sqrt(v)
    # + eps)
    for i in range(params.shape[0]):
        g = grads[i] + weight_decay * params[i]
        vi = alpha * v[i] + (1 - alpha) * g * g
        v[i] = vi
        params[i] -= lr * g / (math.sqrt(vi) + eps)


@njit(cache=True)
def lamb_moments_(grads, m, v, beta1, beta2):
    # Adam's moments
    for i in range(grads.shape[0]):
        g = grads[i]
        m[i] = beta1 * m[i] + (1 - beta1) * g
        v[i] = beta2 * v[i] + (1 - beta2) * g * g


# LARS and LAMB run tensor by tensor: each pass over one tensor is a helper on its slices, where
# the loop vectorises (over offsets into the whole buffer it did not: 5x slower). Sums of squares
# allow reassociation, so they vectorise too (float64 sums of float32 terms: the order changes
# the last bits only).
@njit(cache=True, fastmath={"reassoc"})
def _squares(a, b):
    sa = 0.0
    sb = 0.0
    for i in range(a.shape[0]):
        sa += a[i] * a[i]
        sb += b[i] * b[i]
    return sa, sb


@njit(cache=True)
def _lamb_direction(params, m, v, r, eps, weight_decay, bias1, bias2_sqrt):
    for i in range(params.shape[0]):
        r[i] = (m[i] / bias1) / (np.sqrt(v[i]) / bias2_sqrt + eps) + weight_decay * params[i]


@njit(cache=True)
def lamb_direction_(params, m, v, r, eps, bias1, bias2_sqrt, lo, hi, ids, adapt, decays,
                    squares):
    # r = m_hat / (sqrt(v_hat) + eps) + wd*w per tensor (decays: wd, or 0 for a tensor left out);
    # squares[2k], [2k+1] += this buffer's part of ||w||^2 and ||r||^2 of adapted tensor k = ids[s]
    for s in range(lo.shape[0]):
        a, b = lo[s], hi[s]
        _lamb_direction(params[a:b], m[a:b], v[a:b], r[a:b], eps, decays[s], bias1, bias2_sqrt)
        if adapt[s]:
            sw, sr = _squares(params[a:b], r[a:b])
            squares[2 * ids[s]] += sw
            squares[2 * ids[s] + 1] += sr


@njit(cache=True)
def _minus_scaled(y, alpha, x):
    for i in range(y.shape[0]):
        y[i] -= alpha * x[i]


@njit(cache=True)
def lamb_apply_(params, r, lo, hi, steps):
    # w -= lr * ratio * r per tensor (steps: lr * ratio)
    for s in range(lo.shape[0]):
        _minus_scaled(params[lo[s]:hi[s]], steps[s], r[lo[s]:hi[s]])


@njit(cache=True)
def lars_squares_(params, grads, lo, hi, ids, adapt, squares):
    # squares[2k], [2k+1] += this buffer's part of ||w||^2 and ||g||^2 of tensor k = ids[s]
    for s in range(lo.shape[0]):
        if adapt[s]:
            sw, sg = _squares(params[lo[s]:hi[s]], grads[lo[s]:hi[s]])
            squares[2 * ids[s]] += sw
            squares[2 * ids[s] + 1] += sg


@njit(cache=True)
def _lars_update(params, grads, velocity, mu, step, weight_decay):
    for i in range(params.shape[0]):
        vi = mu * velocity[i] + step * (grads[i] + weight_decay * params[i])
        velocity[i] = vi
        params[i] -= vi


@njit(cache=True)
def lars_apply_(params, grads, velocity, mu, lo, hi, steps, decays):
    # You et al. 2017, Algorithm 1: v = mu*v + lr * ratio * (g + wd*w); w -= v
    for s in range(lo.shape[0]):
        a, b = lo[s], hi[s]
        _lars_update(params[a:b], grads[a:b], velocity[a:b], mu, steps[s], decays[s])


@dataclass(frozen=True)
class Tensors:
    """The parameter tensors in an optimizer's buffer: piece s is [lo[s], hi[s]) of the buffer,
    part of tensor ids[s] of the whole (of n_ids), adapted by a trust ratio (a weight matrix) or
    not (a bias). The pieces cover the buffer; a shard's are cut at its ends, and every shard
    numbers the tensors alike, so their partial sums of squares add up element by element."""
    lo: np.ndarray
    hi: np.ndarray
    ids: np.ndarray
    adapt: np.ndarray     # of each piece
    adapted: np.ndarray   # of each tensor of the whole

    @property
    def n_ids(self):
        return len(self.adapted)

    @classmethod
    def of(cls, spans, start=0, stop=None):
        """From [(lo, hi, adapt)] over a whole buffer, the pieces in [start, stop), shifted to
        0; what lies past the last span (a shard's padding) is one more tensor, left out."""
        end = max((hi for _, hi, _ in spans), default=0)
        stop = end if stop is None else stop
        spans = list(spans) + [(end, max(stop, end), False)]
        cut = [(max(lo, start) - start, min(hi, stop) - start, k, adapt)
               for k, (lo, hi, adapt) in enumerate(spans) if min(hi, stop) > max(lo, start)]
        lo, hi, ids, adapt = (list(c) for c in zip(*cut)) if cut else ([], [], [], [])
        return cls(np.array(lo, np.int64), np.array(hi, np.int64), np.array(ids, np.int64),
                   np.array(adapt, np.bool_), np.array([a for _, _, a in spans], np.bool_))

    @classmethod
    def whole(cls, n):
        """One adapted tensor of n parameters (a buffer that is one matrix)."""
        return cls.of([(0, n, True)])


def trust_ratios(squares, adapt, coefficient, weight_decay, clip, lars):
    """Each tensor's ratio from its summed squares: LARS coefficient*||w|| / (||g|| + wd*||w||),
    LAMB ||w|| / ||r||, capped at clip (> 0); 1 where a norm is 0 or the tensor is left out."""
    w = np.sqrt(squares[0::2])
    u = np.sqrt(squares[1::2])
    if lars:
        u = u + weight_decay * w
    computed = adapt & (w > 0) & (u > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = coefficient * w / u
    if clip > 0:
        ratio = np.minimum(ratio, clip)
    return np.where(computed, ratio, 1.0)  # as DeepSpeed: the cap applies to computed ratios


class Optimizer:
    """One optimizer over a flat buffer of n parameters; `step(params, grads)` updates in place,
    at the rate its schedule gives for this update (lr.Schedule), or at `lr` without one."""

    def __init__(self, name, n, lr, momentum=0.9, nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, dtype=np.float32, schedule=None, alpha=0.99,
                 trust_coefficient=0.001, trust_clip=10.0, tensors=None, reduce_norms=None):
        if name not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
        self.name, self.lr, self.momentum, self.nesterov = name, lr, momentum, nesterov
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.alpha, self.trust_coefficient, self.trust_clip = alpha, trust_coefficient, trust_clip
        # LARS/LAMB: the tensors of this buffer, and the sum of partial squares over the ranks
        # that share them (None: this buffer holds its tensors whole)
        self.tensors = tensors if tensors is not None else Tensors.whole(n)
        self.reduce_norms = reduce_norms
        self.t = 0
        self.schedule = schedule  # update number (0 for the first) -> learning rate; None: lr
        self.state = [np.zeros(n, dtype) for _ in range(STATE_BUFFERS[name])]
        self._scalars_for, self._scalars = None, ()
        self._direction = None  # LAMB's scratch buffer

    def settings(self):
        """The keyword arguments that make another optimizer with this one's rule."""
        return dict(name=self.name, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                    beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                    weight_decay=self.weight_decay, alpha=self.alpha,
                    trust_coefficient=self.trust_coefficient, trust_clip=self.trust_clip)

    def warmup(self, dtype=np.float32):
        """Compile (or load from cache) this update rule on scratch buffers; state is untouched
        and nothing is communicated."""
        scratch = Optimizer(n=1, dtype=dtype, **self.settings())
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
        bias1 = f(1 - self.beta1 ** self.t)
        bias2_sqrt = f(math.sqrt(1 - self.beta2 ** self.t))
        if self.name == "sgd":
            sgd_(params, grads, lr, wd)
        elif self.name == "momentum":
            momentum_(params, grads, self.state[0], lr, mu, wd, self.nesterov)
        elif self.name == "adam":
            adam_(params, grads, self.state[0], self.state[1], lr, beta1, beta2, eps, wd, bias1,
                  bias2_sqrt)
        elif self.name == "adamw":
            adamw_(params, grads, self.state[0], self.state[1], lr, beta1, beta2, eps, wd, bias1,
                   bias2_sqrt)
        elif self.name == "rmsprop":
            rmsprop_(params, grads, self.state[0], lr, f(self.alpha), eps, wd)
        else:
            self._trust_step(params, grads, mu, wd, beta1, beta2, eps, bias1, bias2_sqrt)

    def _trust_step(self, params, grads, mu, wd, beta1, beta2, eps, bias1, bias2_sqrt):
        """LARS or LAMB: each tensor's sums of squares (summed over the ranks that share it), its
        trust ratio, then the update."""
        ts, f = self.tensors, params.dtype.type
        squares = np.zeros(2 * ts.n_ids, np.float64)
        decays = np.where(ts.adapt, self.weight_decay, 0.0).astype(params.dtype)
        if self.name == "lamb":
            if self._direction is None:  # LAMB's step direction r, computed once per update
                self._direction = np.zeros_like(params)
            lamb_moments_(grads, self.state[0], self.state[1], beta1, beta2)
            lamb_direction_(params, self.state[0], self.state[1], self._direction, eps, bias1,
                            bias2_sqrt, ts.lo, ts.hi, ts.ids, ts.adapt, decays, squares)
        else:
            lars_squares_(params, grads, ts.lo, ts.hi, ts.ids, ts.adapt, squares)
        if self.reduce_norms is not None:
            squares = self.reduce_norms(squares)
        lars = self.name == "lars"
        ratio = trust_ratios(squares, ts.adapted, self.trust_coefficient if lars else 1.0,
                             self.weight_decay, self.trust_clip, lars)[ts.ids]
        steps = (self.lr * ratio).astype(params.dtype)
        if lars:
            lars_apply_(params, grads, self.state[0], f(mu), ts.lo, ts.hi, steps, decays)
        else:
            lamb_apply_(params, self._direction, ts.lo, ts.hi, steps)
