"""Pure Numba kernels: forward, loss and backward for a whole dense network, in one call.

Shape letters used throughout:
    N  rows in this call (this rank's part of a global batch; may be 0)
    F  input features            K  outputs (classes or regression targets)
    L  number of layers          fi, fo  fan-in and fan-out of one layer
    P  number of parameters (all layers, one flat buffer)

Parameter layout in the flat buffer: W0 (fi0*fo0, row-major, W of shape (fi, fo)), b0 (fo0), W1,
b1, ... so a layer computes h_next = act(h @ W + b). `w_off[l]` and `b_off[l]` give where each
view starts.

The workspace `acts` holds each layer's output for up to `max_rows` rows (layer l at `a_off[l]`);
`d0`/`d1` are ping-pong buffers for dLoss/dz of max_rows * max(width). All outputs are
preallocated by the caller (model.Workspace); nothing here allocates per step, touches MPI, does
I/O or reads globals.

An activation reaches the kernels as a small float64 array, [code (ACT_*), leaky_relu's negative
slope] (`activation()`), so one compiled kernel serves all networks. The derivatives of relu, tanh,
sigmoid, leaky_relu and softplus are written in terms of the activation's output h, which the
workspace keeps anyway; gelu, gelu_tanh and silu's are not functions of h, so for them the
workspace also keeps each layer's pre-activation z in `pre` (same layout as `acts`; empty for the
others). A pipeline stage whose input came through such an activation cannot apply its derivative
(the z is on the stage before): it sends dLoss/dh back, and the stage before finishes it
(output_act_grad_). The losses (losses.py) pick between the cross-entropy, squared-error and binary
cross-entropy kernels here.

The gradient written is d(scale * sum of per-sample losses)/d(params): the caller passes
scale = 1/global_batch (cross-entropy) or 1/(global_batch*K) (mse), so the sum over ranks of the
per-rank gradients is exactly the gradient of the global mean loss, however the rows are split.
"""
import math

import numpy as np
from numba import njit

from .gemm import gemm_

ACT_IDENTITY, ACT_RELU, ACT_TANH, ACT_SIGMOID, ACT_LEAKY_RELU, ACT_SOFTPLUS = 0, 1, 2, 3, 4, 5
ACT_GELU, ACT_GELU_TANH, ACT_SILU = 6, 7, 8  # from here on, the derivative needs z
ACTIVATIONS = {"identity": ACT_IDENTITY, "relu": ACT_RELU, "tanh": ACT_TANH, "sigmoid": ACT_SIGMOID,
               "leaky_relu": ACT_LEAKY_RELU, "softplus": ACT_SOFTPLUS, "gelu": ACT_GELU,
               "gelu_tanh": ACT_GELU_TANH, "silu": ACT_SILU}
SOFTPLUS_THRESHOLD = 20.0  # PyTorch's: softplus(z) = z above it
SQRT_HALF = 0.7071067811865476  # gelu: x * Phi(x) = x/2 * (1 + erf(x / sqrt 2))
SQRT_2_OVER_PI, GELU_CUBIC = 0.7978845608028654, 0.044715  # gelu_tanh, PyTorch's approximate="tanh"


def activation(name, slope=0.01):
    """The kernels' form of an activation: [its code, leaky_relu's negative slope]."""
    return np.array([ACTIVATIONS[name], slope], np.float64)


IDENTITY = activation("identity")  # a constant: the logits of cross-entropy and bce


def needs_pre_activation(name):
    """Whether the derivative of this activation needs z (the workspace keeps `pre` for it)."""
    return ACTIVATIONS[name] >= ACT_GELU


@njit(cache=True)
def _from_z(code):
    return code >= ACT_GELU


@njit(cache=True)
def _act_of_z(v, code):
    """gelu, gelu_tanh or silu of z = v (in float64)."""
    v = np.float64(v)
    if code == ACT_GELU:
        return 0.5 * v * (1.0 + math.erf(v * SQRT_HALF))
    if code == ACT_GELU_TANH:
        return 0.5 * v * (1.0 + np.tanh(SQRT_2_OVER_PI * (v + GELU_CUBIC * v * v * v)))
    return v / (1.0 + np.exp(-v))


@njit(cache=True)
def _act_grad_z(v, code):
    """act'(z) at z = v (in float64) of gelu, gelu_tanh or silu."""
    v = np.float64(v)
    if code == ACT_GELU:  # Phi(z) + z phi(z)
        return (0.5 * (1.0 + math.erf(v * SQRT_HALF))
                + v * 0.3989422804014327 * np.exp(-0.5 * v * v))
    if code == ACT_GELU_TANH:
        t = np.tanh(SQRT_2_OVER_PI * (v + GELU_CUBIC * v * v * v))
        return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * SQRT_2_OVER_PI * (
            1.0 + 3.0 * GELU_CUBIC * v * v)
    s = 1.0 / (1.0 + np.exp(-v))  # silu: s (1 + z (1 - s))
    return s * (1.0 + v * (1.0 - s))


@njit(cache=True)
def _activate_(h, act):
    """Apply `act` (activation()) in place to the 2-D array h."""
    code = int(act[0])
    if code == ACT_IDENTITY:
        return
    if _from_z(code):  # a loop of its own: one loop of every branch compiles far slower
        _activate_z_(h, code)
        return
    slope = h.dtype.type(act[1])
    n, m = h.shape
    for i in range(n):
        for j in range(m):
            v = h[i, j]
            if code == ACT_RELU:
                h[i, j] = v if v > 0 else 0
            elif code == ACT_TANH:
                h[i, j] = np.tanh(v)
            elif code == ACT_LEAKY_RELU:
                h[i, j] = v if v > 0 else slope * v
            elif code == ACT_SOFTPLUS:
                h[i, j] = v if v > SOFTPLUS_THRESHOLD else np.log1p(np.exp(v))
            else:
                h[i, j] = 1 / (1 + np.exp(-v))


@njit(cache=True)
def _activate_z_(h, code):
    """gelu, gelu_tanh or silu (code) in place on the 2-D array h."""
    n, m = h.shape
    for i in range(n):
        for j in range(m):
            h[i, j] = _act_of_z(h[i, j], code)


@njit(cache=True)
def _act_grad(v, code, slope, one):
    """act'(z) from the output v = act(z), in v's type (one: 1 in it): leaky_relu's sign survives
    it; softplus's h gives sigmoid(z) = 1 - exp(-h), as -expm1(-h) so small outputs keep their
    digits."""
    if code == ACT_RELU:
        return one if v > 0 else one - one
    if code == ACT_TANH:
        return one - v * v
    if code == ACT_SIGMOID:
        return v * (one - v)
    if code == ACT_LEAKY_RELU:
        return one if v > 0 else slope
    if code == ACT_SOFTPLUS:
        return -np.expm1(-v)
    return one


@njit(cache=True)
def _times_act_grad_(d, h, act):
    """d *= act'(z), written in terms of the activation's output h = act(z), or for gelu,
    gelu_tanh and silu given z itself in h. relu, tanh and sigmoid keep their own branches (the
    backward pass's common case, as before _act_grad); the others go through _act_grad."""
    code = int(act[0])
    if code == ACT_IDENTITY:
        return
    if _from_z(code):
        _times_act_grad_z_(d, h, code)
        return
    slope = h.dtype.type(act[1])
    n, m = d.shape
    for i in range(n):
        for j in range(m):
            v = h[i, j]
            if code == ACT_RELU:
                if v <= 0:
                    d[i, j] = 0
            elif code == ACT_TANH:
                d[i, j] *= 1 - v * v
            elif code == ACT_SIGMOID:
                d[i, j] *= v * (1 - v)
            else:
                d[i, j] *= _act_grad(v, code, slope, h.dtype.type(1))


@njit(cache=True)
def _times_act_grad_z_(d, z, code):
    """d *= act'(z) of gelu, gelu_tanh or silu (code)."""
    n, m = d.shape
    for i in range(n):
        for j in range(m):
            d[i, j] *= _act_grad_z(z[i, j], code)


@njit(cache=True)
def _view2(buf, off, rows, cols):
    return buf[off:off + rows * cols].reshape((rows, cols))


@njit(cache=True)
def _copy_(dst, src):
    """dst[...] = src for 2-D arrays of one shape (a loop: slice assignment compiles slowly)."""
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[i, j] = src[i, j]


@njit(cache=True)
def _pre_view(pre, off, rows, cols):
    """The (rows, cols) view of pre at off, or an empty one when pre holds nothing (a workspace
    whose activations need no z)."""
    if pre.shape[0] == 0:
        return pre[:0].reshape((0, cols))
    return _view2(pre, off, rows, cols)


# -- dropout -------------------------------------------------------------------------------------
# Inverted dropout on hidden outputs, training only. Whether unit u of file row r is kept in update
# t is a pure function of (seed, t, r, u): a counter-based hash (splitmix64's finaliser), so masks
# do not depend on how rows are split over ranks, pieces or pipeline stages, and backward recomputes
# them instead of storing them. `drop` = [threshold, key, last_hidden] (uint64): a unit is dropped
# when its hash is below threshold = p * 2**64 (0: no dropout); key mixes seed and update;
# last_hidden: this call's last layer is a hidden one (a pipeline stage before the last).
# `units[l]` is where layer l's input units start in the network's numbering of hidden units
# (units[l + 1]: its output units); `rows` holds the file row of each of the N rows.
M1, M2, GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(
    0x9E3779B97F4A7C15)
S30, S27, S31 = np.uint64(30), np.uint64(27), np.uint64(31)


@njit(cache=True)
def _mix(z):
    z = (z ^ (z >> S30)) * M1
    z = (z ^ (z >> S27)) * M2
    return z ^ (z >> S31)


@njit(cache=True)
def dropout_key(seed, update):
    """The hash key of one optimizer update of one run."""
    return _mix(_mix(np.uint64(seed)) ^ np.uint64(update))


@njit(cache=True)
def _kept(key, row, unit, threshold):
    return _mix(key ^ _mix(np.uint64(row) * GOLDEN + np.uint64(unit))) >= threshold


@njit(cache=True)
def dropout_mask(drop, rows, unit0, width):
    """The keep mask (N, width) of the units [unit0, unit0 + width) (for tests and references)."""
    out = np.zeros((rows.shape[0], width), np.bool_)
    for i in range(rows.shape[0]):
        for j in range(width):
            out[i, j] = _kept(drop[1], rows[i], unit0 + j, drop[0])
    return out


@njit(cache=True)
def _keep_scale(threshold):
    return 1.0 / (1.0 - float(threshold) * 5.421010862427522e-20)  # 1 / (1 - p)


@njit(cache=True)
def _dropout_(h, drop, rows, unit0):
    """h (N, m) of hidden units [unit0, unit0 + m): dropped units 0, kept ones times 1/(1-p)."""
    scale = h.dtype.type(_keep_scale(drop[0]))
    n, m = h.shape
    for i in range(n):
        for j in range(m):
            if _kept(drop[1], rows[i], unit0 + j, drop[0]):
                h[i, j] *= scale
            else:
                h[i, j] = 0


@njit(cache=True)
def _times_dropout_act_grad_(d, h, act, drop, rows, unit0):
    """d *= mask/(1-p) * act'(z) for a dropped-out hidden output h = act(z) * mask/(1-p) (for
    gelu, gelu_tanh and silu, h is z itself, kept before activation and dropout)."""
    scale = h.dtype.type(_keep_scale(drop[0]))
    code, slope = int(act[0]), h.dtype.type(act[1])
    n, m = d.shape
    for i in range(n):
        for j in range(m):
            if not _kept(drop[1], rows[i], unit0 + j, drop[0]):
                d[i, j] = 0
            elif _from_z(code):
                d[i, j] *= scale * _act_grad_z(h[i, j], code)
            else:
                v = h[i, j] / scale  # act(z) before dropout
                d[i, j] *= scale * _act_grad(v, code, slope, h.dtype.type(1))


@njit(cache=True, nogil=True)
def output_act_grad_(d, pre, act, drop, rows, unit0):
    """A pipeline stage whose last layer is a hidden gelu, gelu_tanh or silu one: turn the
    dLoss/dh the next stage sent back (N, fo, row-major in the output slot) into dLoss/dz, with
    the z its forward kept (pre, (N, fo)) and its dropout mask (drop[2]: dropout on this output).
    Every other activation's derivative the next stage applied already: nothing to do."""
    code = int(act[0])
    if not _from_z(code):
        return
    if drop[0] > 0 and drop[2] > 0:
        _times_dropout_act_grad_(d, pre, act, drop, rows, unit0)
    else:
        _times_act_grad_(d, pre, act)


@njit(cache=True)
def _add_bias_rows_(z, b):
    """z (N, fo) += b (fo,) on every row."""
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            z[i, j] += b[j]


@njit(cache=True)
def _bias_activate_fm_(zT, b, act, preT):
    """zT (fo, N), feature-major: zT[j] = act(zT[j] + b[j]), one pass (the activation's test is
    outside the loops so each loop vectorises); an activation whose derivative needs z keeps
    zT[j] + b[j] in preT first."""
    fo, n = zT.shape
    code = int(act[0])
    for j in range(fo):
        bj = b[j]
        if code == ACT_RELU:
            for i in range(n):
                v = zT[j, i] + bj
                zT[j, i] = v if v > 0 else 0
        elif code == ACT_IDENTITY:
            for i in range(n):
                zT[j, i] += bj
        else:
            for i in range(n):
                zT[j, i] += bj
            if _from_z(code):
                for i in range(n):
                    preT[j, i] = zT[j, i]
            _activate_(zT[j:j + 1], act)


@njit(cache=True)
def _sum_columns_(gb, d):
    """gb (fo,) = the sum of d (N, fo) over its rows."""
    gb[:] = 0
    for i in range(d.shape[0]):
        for j in range(d.shape[1]):
            gb[j] += d[i, j]


@njit(cache=True, fastmath={"reassoc"})
def _sum_rows_(gb, dT):
    """gb (fo,) = the sum of dT (fo, N) over its columns (feature-major: one per row). Only
    reassociation is allowed, so each row's sum vectorises; NaN and inf keep their meaning."""
    for j in range(dT.shape[0]):
        s = dT.dtype.type(0)
        for i in range(dT.shape[1]):
            s += dT[j, i]
        gb[j] = s


# Layout in the workspace: a layer's output is feature-major, (fo, N), the orientation in which the
# BLAS runs the forward and input-gradient GEMMs fastest (gemm.py), except the last layer of a
# call, which is row-major (N, fo): the loss, the predictions and a pipeline stage's output read it
# as rows. The same holds for dLoss/dz in d0/d1. x and dx are row-major (N, F).


@njit(cache=True, nogil=True)
def forward(params, x, sizes, w_off, b_off, acts, pre, a_off, act, out_act, drop, rows, units):
    """Forward pass over all layers for the N rows of x. Layer l's output is written to acts at
    a_off[l] (feature-major, the last layer row-major (N, K) holding out_act(z_L)), and its z to
    pre at the same place when its activation's derivative needs z (pre empty otherwise). Hidden
    outputs go through dropout when drop[0] > 0 (see above)."""
    n = x.shape[0]
    n_layers = sizes.shape[0] - 1
    hT = _view2(acts, 0, 0, n)  # the previous layer's output, feature-major
    for l in range(n_layers):
        fi, fo = sizes[l], sizes[l + 1]
        W = _view2(params, w_off[l], fi, fo)
        b = params[b_off[l]:b_off[l] + fo]
        if l == n_layers - 1:
            z = _view2(acts, a_off[l], n, fo)
            if l == 0:
                gemm_(False, x, False, W, z)
            else:
                gemm_(True, hT, False, W, z)
            _add_bias_rows_(z, b)
            if _from_z(int(out_act[0])):  # a pipeline stage's last hidden layer
                _copy_(_view2(pre, a_off[l], n, fo), z)
            _activate_(z, out_act)
            if drop[0] > 0 and drop[2] > 0:
                _dropout_(z, drop, rows, units[l + 1])
        else:
            zT = _view2(acts, a_off[l], fo, n)
            if l == 0:
                gemm_(True, W, True, x, zT)
            else:
                gemm_(True, W, False, hT, zT)
            _bias_activate_fm_(zT, b, act, _pre_view(pre, a_off[l], fo, n))
            if drop[0] > 0:
                _dropout_(zT.T, drop, rows, units[l + 1])
            hT = zT


@njit(cache=True, nogil=True)
def backward(grads, params, x, sizes, w_off, b_off, acts, pre, a_off, act, d0, d1, dx, want_dx,
             drop, rows, units, bound):
    """Backpropagate through all layers. On entry the output layer's slot in acts holds
    dLoss/dz_L (N, K); grads (P,) is overwritten with dLoss/dparams. d0/d1 are scratch.
    With want_dx (a pipeline stage after the first), dx (N, F) receives dLoss/dz of the layer that
    produced x: (d @ W0^T) * act'(x), which the previous stage continues from (for an activation
    whose derivative needs z, d @ W0^T: the previous stage applies act', output_act_grad_).
    bound[0] receives a bound on |dLoss/dparams| (see backward_layers)."""
    backward_layers(grads, params, x, sizes, w_off, b_off, acts, pre, a_off, act, d0, d1, dx,
                    want_dx, sizes.shape[0] - 1, 0, drop, rows, units, bound)


@njit(cache=True, nogil=True)
def backward_layers(grads, params, x, sizes, w_off, b_off, acts, pre, a_off, act, d0, d1, dx,
                    want_dx, hi, lo, drop, rows, units, bound):
    """Backpropagate through layers hi-1 down to lo only (gradients of those layers written), so
    a caller can reduce finished layers' gradients while earlier layers are still computed. The
    incoming dLoss/dz of layer hi-1 is where the previous call left it: the output slot (N, K)
    when hi is the last layer, else d0 or d1 (layer m's in d0 when m+1 is even; feature-major).

    bound[0] (reset when hi is the last layer, raised by every call after) becomes a number no
    gradient element of these layers can exceed in magnitude: each is a sum over the N rows of
    products h_in * dLoss/dz (or of dLoss/dz alone for a bias), so N * max|h_in| * max|dLoss/dz|
    bounds it and every partial sum the BLAS forms, whatever its order; inf when an input to them
    is not finite. Below CERTAIN_FINITE, the gradient is finite without reading it. An empty
    `bound` skips it (its passes over activations cost more than reading a small gradient)."""
    n = x.shape[0]
    n_layers = sizes.shape[0] - 1
    from_z = _from_z(int(act[0]))
    if hi == n_layers and bound.shape[0]:
        bound[0] = 0.0
    if hi == n_layers:
        d = _view2(acts, a_off[n_layers - 1], n, sizes[n_layers])
    else:
        d = _view2(d0 if hi % 2 == 0 else d1, 0, sizes[hi], n)
    for l in range(hi - 1, lo - 1, -1):
        fi, fo = sizes[l], sizes[l + 1]
        rows_d = l == n_layers - 1  # d is (N, fo); else (fo, N)
        hT = _view2(acts, a_off[l - 1], fi, n) if l > 0 else x
        gW = _view2(grads, w_off[l], fi, fo)
        gemm_(l == 0, hT, not rows_d, d, gW)  # h_in^T @ dLoss/dz
        if bound.shape[0]:
            _raise_bound_(bound, n, _max_abs(hT), _max_abs(d))
        gb = grads[b_off[l]:b_off[l] + fo]
        if rows_d:
            _sum_columns_(gb, d)
        else:
            _sum_rows_(gb, d)
        if l > 0:
            W = _view2(params, w_off[l], fi, fo)
            dT = _view2(d0 if l % 2 == 0 else d1, 0, fi, n)
            gemm_(False, W, rows_d, d, dT)  # W @ dLoss/dz^T
            src = _view2(pre, a_off[l - 1], fi, n) if from_z else hT  # what act' is written in
            if drop[0] > 0:  # hT is a hidden output (the first stage's data is not)
                _times_dropout_act_grad_(dT.T, src.T, act, drop, rows, units[l])
            else:
                _times_act_grad_(dT, src, act)
            d = dT
        elif want_dx:
            W = _view2(params, w_off[l], fi, fo)
            gemm_(not rows_d, d, True, W, dx)  # dLoss/dz @ W^T, row-major like x
            # (gelu, gelu_tanh, silu: the previous stage holds z and applies act' itself)
            if drop[0] > 0 and not from_z:
                _times_dropout_act_grad_(dx, x, act, drop, rows, units[l])
            elif not from_z:
                _times_act_grad_(dx, x, act)


@njit(cache=True, nogil=True)
def cross_entropy_grad_(logits, labels, scale, class_weight, row_weight):
    """Turn logits (N, K) in place into scale * dLoss/dz of softmax cross-entropy, each row's
    loss weighted by class_weight[its label] times row_weight[row] (an empty array: 1). Returns
    (sum of the weighted per-sample losses, number of correct argmax predictions), unscaled."""
    n, k = logits.shape
    loss = 0.0
    correct = 0
    weighted = class_weight.shape[0] > 0
    per_row = row_weight.shape[0] > 0
    for i in range(n):
        m = logits[i, 0]
        best = 0
        for j in range(1, k):
            if logits[i, j] > m:
                m = logits[i, j]
                best = j
        s = 0.0
        for j in range(k):
            s += np.exp(logits[i, j] - m)
        y = labels[i]
        w = class_weight[y] if weighted else 1.0
        if per_row:
            w *= row_weight[i]
        loss += w * (np.log(s) + m - logits[i, y])
        if best == y:
            correct += 1
        for j in range(k):
            p = np.exp(logits[i, j] - m) / s
            logits[i, j] = (p - (1.0 if j == y else 0.0)) * (scale * w)
    return loss, correct


@njit(cache=True, nogil=True)
def mse_grad_(out, targets, out_act, scale, row_weight):
    """Turn outputs (N, K) = out_act(z) in place into scale * dLoss/dz of squared error, each
    row's errors weighted by row_weight[row] (an empty array: 1). Returns (sum of the weighted
    squared errors over all elements, 0)."""
    n, k = out.shape
    loss = 0.0
    per_row = row_weight.shape[0] > 0
    code, slope = int(out_act[0]), out.dtype.type(out_act[1])
    for i in range(n):
        w = row_weight[i] if per_row else 1.0
        for j in range(k):
            o = out[i, j]
            e = o - targets[i, j]
            loss += w * e * e
            out[i, j] = 2 * e * scale * w * _act_grad(o, code, slope, out.dtype.type(1))
    return loss, 0


@njit(cache=True, nogil=True)
def bce_grad_(logits, targets, pos_weight, scale, row_weight):
    """Turn logits (N, K) in place into scale * dLoss/dz of sigmoid binary cross-entropy per
    element, positives weighted by pos_weight (K,) as torch's BCEWithLogitsLoss(pos_weight):
    l = (1 - y) z + (1 + (p - 1) y) log(1 + exp(-z)), computed stably, each row's weighted by
    row_weight[row] (an empty array: 1). Returns (sum of the weighted element losses, rows whose
    every label is on the right side of 0.5), both unscaled."""
    n, k = logits.shape
    loss = 0.0
    correct = 0
    per_row = row_weight.shape[0] > 0
    for i in range(n):
        w = row_weight[i] if per_row else 1.0
        right = True
        for j in range(k):
            z = np.float64(logits[i, j])
            y = np.float64(targets[i, j])
            weight = 1.0 + (pos_weight[j] - 1.0) * y
            softplus_neg = np.log1p(np.exp(-abs(z))) + max(-z, 0.0)  # log(1 + exp(-z))
            loss += w * ((1.0 - y) * z + weight * softplus_neg)
            if (z > 0) != (y > 0.5):
                right = False
            sig = 1.0 / (1.0 + np.exp(-z)) if z >= 0 else np.exp(z) / (1.0 + np.exp(z))
            logits[i, j] = ((1.0 - y) - weight * (1.0 - sig)) * (scale * w)
        if right:
            correct += 1
    return loss, correct


@njit(cache=True)
def sigmoid_(a):
    """Logits (N, K) -> probabilities, in place."""
    n, k = a.shape
    for i in range(n):
        for j in range(k):
            z = a[i, j]
            a[i, j] = 1.0 / (1.0 + np.exp(-z)) if z >= 0 else np.exp(z) / (1.0 + np.exp(z))


@njit(cache=True)
def softmax_(logits):
    """Rows of logits (N, K) -> probabilities, in place."""
    n, k = logits.shape
    for i in range(n):
        m = logits[i, 0]
        for j in range(1, k):
            m = max(m, logits[i, j])
        s = 0.0
        for j in range(k):
            logits[i, j] = np.exp(logits[i, j] - m)
            s += logits[i, j]
        for j in range(k):
            logits[i, j] /= s


@njit(cache=True, nogil=True)
def train_step_ce(grads, params, x, labels, scale, class_weight, row_weight, sizes, w_off, b_off,
                  acts, pre, a_off, act, d0, d1, drop, rows, units, bound):
    """Forward, softmax cross-entropy and backward for N rows; grads (P,) overwritten.
    Returns (loss sum, correct count) over these rows."""
    n_layers = sizes.shape[0] - 1
    if x.shape[0] == 0:
        grads[:] = 0
        bound[:] = 0.0
        return 0.0, 0
    forward(params, x, sizes, w_off, b_off, acts, pre, a_off, act, IDENTITY, drop, rows, units)
    z = _view2(acts, a_off[n_layers - 1], x.shape[0], sizes[n_layers])
    loss, correct = cross_entropy_grad_(z, labels, scale, class_weight, row_weight)
    backward(grads, params, x, sizes, w_off, b_off, acts, pre, a_off, act, d0, d1, x, False, drop,
             rows, units, bound)
    return loss, correct


@njit(cache=True, nogil=True)
def train_step_mse(grads, params, x, targets, scale, row_weight, sizes, w_off, b_off, acts, pre,
                   a_off, act, out_act, d0, d1, drop, rows, units, bound):
    """Forward, squared error and backward for N rows; grads (P,) overwritten.
    Returns (sum of squared errors, 0) over these rows."""
    n_layers = sizes.shape[0] - 1
    if x.shape[0] == 0:
        grads[:] = 0
        bound[:] = 0.0
        return 0.0, 0
    forward(params, x, sizes, w_off, b_off, acts, pre, a_off, act, out_act, drop, rows, units)
    out = _view2(acts, a_off[n_layers - 1], x.shape[0], sizes[n_layers])
    loss, _ = mse_grad_(out, targets, out_act, scale, row_weight)
    backward(grads, params, x, sizes, w_off, b_off, acts, pre, a_off, act, d0, d1, x, False, drop,
             rows, units, bound)
    return loss, 0


@njit(cache=True, nogil=True)
def train_step_bce(grads, params, x, targets, scale, pos_weight, row_weight, sizes, w_off, b_off,
                   acts, pre, a_off, act, d0, d1, drop, rows, units, bound):
    """Forward, sigmoid binary cross-entropy and backward for N rows; grads (P,) overwritten.
    Returns (loss sum over the elements, rows right) over these rows."""
    n_layers = sizes.shape[0] - 1
    if x.shape[0] == 0:
        grads[:] = 0
        bound[:] = 0.0
        return 0.0, 0
    forward(params, x, sizes, w_off, b_off, acts, pre, a_off, act, IDENTITY, drop, rows, units)
    z = _view2(acts, a_off[n_layers - 1], x.shape[0], sizes[n_layers])
    loss, correct = bce_grad_(z, targets, pos_weight, scale, row_weight)
    backward(grads, params, x, sizes, w_off, b_off, acts, pre, a_off, act, d0, d1, x, False, drop,
             rows, units, bound)
    return loss, correct


# A gradient bound below this is certainly finite: ranks sum their bounds in float32 (whose largest
# value is 3.4e38), and the BLAS's rounding can raise a partial sum over the bound by a factor
# (1 + 2**-24)**N, under 2 for any batch this tool runs.
CERTAIN_FINITE = 1e37


@njit(cache=True)
def _max_abs(a):
    """max |a| over the contiguous array a, or inf when any element is not finite, in one
    vectorised pass: with the sign bit cleared, a float's bits order like its magnitude as
    unsigned integers, and NaN and inf sort above every finite value."""
    flat = a.ravel()
    if flat.itemsize == 4:
        m = _max_bits(flat.view(np.uint32), np.uint32(0x7FFFFFFF))
        if m >= np.uint32(0x7F800000):
            return np.inf
        return float(np.array([m]).view(np.float32)[0])
    m = _max_bits(flat.view(np.uint64), np.uint64(0x7FFFFFFFFFFFFFFF))
    if m >= np.uint64(0x7FF0000000000000):
        return np.inf
    return float(np.array([m]).view(np.float64)[0])


@njit(cache=True)
def _max_bits(bits, mask):
    m = bits.dtype.type(0)
    for i in range(bits.shape[0]):
        v = bits[i] & mask
        m = v if v > m else m
    return m


@njit(cache=True)
def _raise_bound_(bound, n, max_h, max_d):
    """bound[0] = max(bound[0], n * max(max_h, 1) * max_d), inf when that is not finite."""
    b = n * max(max_h, 1.0) * max_d
    if not b < np.inf:  # inf, or NaN from inf * 0
        b = np.inf
    if b > bound[0]:
        bound[0] = b


@njit(cache=True, fastmath={"reassoc"})
def all_finite(a):
    """True when no element of the 1-D array a is NaN or inf. Sums a[i] - a[i], which is 0 for a
    finite value and NaN otherwise, so the loop is a vectorised reduction at memory speed (only
    reassociation is allowed: NaN and inf keep their meaning, and no finite value can overflow)."""
    if a.shape[0] == 0:
        return True
    s = a[0] - a[0]
    for i in range(a.shape[0]):
        s += a[i] - a[i]
    return s == 0


@njit(cache=True, fastmath={"reassoc"})
def sum_squares(a):
    """Sum of a[i]**2 over the 1-D array a, accumulated in float64 (vectorised)."""
    s = 0.0
    for i in range(a.shape[0]):
        v = np.float64(a[i])
        s += v * v
    return s


@njit(cache=True)
def scale_(a, factor):
    """a *= factor, in place."""
    for i in range(a.shape[0]):
        a[i] *= factor
