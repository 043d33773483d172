"""Pure Numba kernels: forward, loss and backward for a whole dense network, in one call.

Shape letters used throughout:
    N  rows in this call (this rank's part of a global batch; may be 0)
    F  input features            K  outputs (classes or regression targets)
    L  number of layers          fi, fo  fan-in and fan-out of one layer
    P  number of parameters (all layers, one flat buffer)

Parameter layout in the flat buffer: W0 (fi0*fo0, row-major, W of shape (fi, fo)), b0 (fo0), W1, b1, ...
so a layer computes h_next = act(h @ W + b). `w_off[l]` and `b_off[l]` give where each view starts.

The workspace `acts` holds each layer's output for up to `max_rows` rows (layer l at `a_off[l]`);
`d0`/`d1` are ping-pong buffers for dLoss/dz of max_rows * max(width). All outputs are preallocated
by the caller (model.Workspace); nothing here allocates per step, touches MPI, does I/O or reads globals.

Activation codes (ACT_*) are plain ints so one compiled kernel serves all networks; the losses
(losses.py) pick between the cross-entropy and squared-error kernels here.

The gradient written is d(scale * sum of per-sample losses)/d(params): the caller passes
scale = 1/global_batch (cross-entropy) or 1/(global_batch*K) (mse), so the sum over ranks of the
per-rank gradients is exactly the gradient of the global mean loss, however the rows are split.
"""
import numpy as np
from numba import njit

ACT_IDENTITY, ACT_RELU, ACT_TANH, ACT_SIGMOID = 0, 1, 2, 3
ACTIVATIONS = {"identity": ACT_IDENTITY, "relu": ACT_RELU, "tanh": ACT_TANH, "sigmoid": ACT_SIGMOID}


@njit(cache=True)
def _activate_(h, act):
    """Apply `act` in place to the 2-D array h."""
    if act == ACT_IDENTITY:
        return
    n, m = h.shape
    for i in range(n):
        for j in range(m):
            v = h[i, j]
            if act == ACT_RELU:
                h[i, j] = v if v > 0 else 0
            elif act == ACT_TANH:
                h[i, j] = np.tanh(v)
            else:
                h[i, j] = 1 / (1 + np.exp(-v))


@njit(cache=True)
def _times_act_grad_(d, h, act):
    """d *= act'(z), written in terms of the activation's output h = act(z)."""
    if act == ACT_IDENTITY:
        return
    n, m = d.shape
    for i in range(n):
        for j in range(m):
            v = h[i, j]
            if act == ACT_RELU:
                if v <= 0:
                    d[i, j] = 0
            elif act == ACT_TANH:
                d[i, j] *= 1 - v * v
            else:
                d[i, j] *= v * (1 - v)


@njit(cache=True)
def _view2(buf, off, rows, cols):
    return buf[off:off + rows * cols].reshape((rows, cols))


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
    """d *= mask/(1-p) * act'(z) for a dropped-out hidden output h = act(z) * mask/(1-p)."""
    scale = h.dtype.type(_keep_scale(drop[0]))
    n, m = d.shape
    for i in range(n):
        for j in range(m):
            if not _kept(drop[1], rows[i], unit0 + j, drop[0]):
                d[i, j] = 0
                continue
            v = h[i, j] / scale  # act(z) before dropout
            if act == ACT_RELU:
                g = scale if v > 0 else 0
            elif act == ACT_TANH:
                g = scale * (1 - v * v)
            elif act == ACT_SIGMOID:
                g = scale * v * (1 - v)
            else:
                g = scale
            d[i, j] *= g


@njit(cache=True)
def forward(params, x, sizes, w_off, b_off, acts, a_off, act, out_act, drop, rows, units):
    """Forward pass over all layers for the N rows of x. Layer l's output (N, fo) is written to
    acts at a_off[l]; the last layer's holds out_act(z_L). Hidden outputs go through dropout when
    drop[0] > 0 (see above)."""
    n = x.shape[0]
    n_layers = sizes.shape[0] - 1
    h = x
    for l in range(n_layers):
        fi, fo = sizes[l], sizes[l + 1]
        W = _view2(params, w_off[l], fi, fo)
        b = params[b_off[l]:b_off[l] + fo]
        z = _view2(acts, a_off[l], n, fo)
        np.dot(h, W, z)
        for i in range(n):
            for j in range(fo):
                z[i, j] += b[j]
        last = l == n_layers - 1
        _activate_(z, out_act if last else act)
        if drop[0] > 0 and (not last or drop[2] > 0):
            _dropout_(z, drop, rows, units[l + 1])
        h = z


@njit(cache=True)
def backward(grads, params, x, sizes, w_off, b_off, acts, a_off, act, d0, d1, dx, want_dx, drop,
             rows, units):
    """Backpropagate through all layers. On entry the output layer's slot in acts holds
    dLoss/dz_L (N, K); grads (P,) is overwritten with dLoss/dparams. d0/d1 are scratch.
    With want_dx (a pipeline stage after the first), dx (N, F) receives dLoss/dz of the layer that
    produced x: (d @ W0^T) * act'(x), which the previous stage continues from."""
    backward_layers(grads, params, x, sizes, w_off, b_off, acts, a_off, act, d0, d1, dx, want_dx,
                    sizes.shape[0] - 1, 0, drop, rows, units)


@njit(cache=True)
def backward_layers(grads, params, x, sizes, w_off, b_off, acts, a_off, act, d0, d1, dx, want_dx,
                    hi, lo, drop, rows, units):
    """Backpropagate through layers hi-1 down to lo only (gradients of those layers written), so
    a caller can reduce finished layers' gradients while earlier layers are still computed. The
    incoming dLoss/dz of layer hi-1 is where the previous call left it: the output slot when hi is
    the last layer, else d0 or d1 (layer m's in d0 when m+1 is even)."""
    n = x.shape[0]
    n_layers = sizes.shape[0] - 1
    if hi == n_layers:
        d = _view2(acts, a_off[n_layers - 1], n, sizes[n_layers])
    else:
        d = _view2(d0 if hi % 2 == 0 else d1, 0, n, sizes[hi])
    for l in range(hi - 1, lo - 1, -1):
        fi, fo = sizes[l], sizes[l + 1]
        h_in = x if l == 0 else _view2(acts, a_off[l - 1], n, fi)
        gW = _view2(grads, w_off[l], fi, fo)
        np.dot(h_in.T, d, gW)
        gb = grads[b_off[l]:b_off[l] + fo]
        gb[:] = 0
        for i in range(n):
            for j in range(fo):
                gb[j] += d[i, j]
        if l > 0 or want_dx:
            W = _view2(params, w_off[l], fi, fo)
            d_prev = dx if l == 0 else _view2(d0 if l % 2 == 0 else d1, 0, n, fi)
            np.dot(d, W.T, d_prev)
            if drop[0] > 0:  # h_in is a hidden output (the first stage's data is not)
                _times_dropout_act_grad_(d_prev, h_in, act, drop, rows, units[l])
            else:
                _times_act_grad_(d_prev, h_in, act)
            d = d_prev


@njit(cache=True)
def cross_entropy_grad_(logits, labels, scale):
    """Turn logits (N, K) in place into scale * dLoss/dz of softmax cross-entropy.
    Returns (sum of per-sample losses, number of correct argmax predictions), both unscaled."""
    n, k = logits.shape
    loss = 0.0
    correct = 0
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
        loss += np.log(s) + m - logits[i, y]
        if best == y:
            correct += 1
        for j in range(k):
            p = np.exp(logits[i, j] - m) / s
            logits[i, j] = (p - (1.0 if j == y else 0.0)) * scale
    return loss, correct


@njit(cache=True)
def mse_grad_(out, targets, out_act, scale):
    """Turn outputs (N, K) = out_act(z) in place into scale * dLoss/dz of squared error.
    Returns (sum of squared errors over all elements, 0)."""
    n, k = out.shape
    loss = 0.0
    for i in range(n):
        for j in range(k):
            o = out[i, j]
            e = o - targets[i, j]
            loss += e * e
            g = 2 * e * scale
            if out_act == ACT_SIGMOID:
                g *= o * (1 - o)
            elif out_act == ACT_TANH:
                g *= 1 - o * o
            elif out_act == ACT_RELU and o <= 0:
                g = 0
            out[i, j] = g
    return loss, 0


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


@njit(cache=True)
def train_step_ce(grads, params, x, labels, scale, sizes, w_off, b_off, acts, a_off, act, d0, d1,
                  drop, rows, units):
    """Forward, softmax cross-entropy and backward for N rows; grads (P,) overwritten.
    Returns (loss sum, correct count) over these rows."""
    n_layers = sizes.shape[0] - 1
    if x.shape[0] == 0:
        grads[:] = 0
        return 0.0, 0
    forward(params, x, sizes, w_off, b_off, acts, a_off, act, ACT_IDENTITY, drop, rows, units)
    z = _view2(acts, a_off[n_layers - 1], x.shape[0], sizes[n_layers])
    loss, correct = cross_entropy_grad_(z, labels, scale)
    backward(grads, params, x, sizes, w_off, b_off, acts, a_off, act, d0, d1, x, False, drop, rows,
             units)
    return loss, correct


@njit(cache=True)
def train_step_mse(grads, params, x, targets, scale, sizes, w_off, b_off, acts, a_off, act, out_act,
                   d0, d1, drop, rows, units):
    """Forward, squared error and backward for N rows; grads (P,) overwritten.
    Returns (sum of squared errors, 0) over these rows."""
    n_layers = sizes.shape[0] - 1
    if x.shape[0] == 0:
        grads[:] = 0
        return 0.0, 0
    forward(params, x, sizes, w_off, b_off, acts, a_off, act, out_act, drop, rows, units)
    out = _view2(acts, a_off[n_layers - 1], x.shape[0], sizes[n_layers])
    loss, _ = mse_grad_(out, targets, out_act, scale)
    backward(grads, params, x, sizes, w_off, b_off, acts, a_off, act, d0, d1, x, False, drop, rows,
             units)
    return loss, 0


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
