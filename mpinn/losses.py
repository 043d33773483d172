"""The losses, chosen once by name (`LOSSES[name]`) and then used as objects: what the labels are,
which kernels compute the loss and its gradient, how a batch's gradient is scaled, how sums become
the reported mean, and what prediction outputs look like. Nothing else compares loss names.

    cross_entropy  integer class labels (N,), softmax over K logits, mean over rows; accuracy too
    mse            float targets (N, K) of out_act(z), mean over all N*K elements (PyTorch's mean)
    bce            0/1 targets (N, K), one sigmoid per logit (binary, K = 1, or multi-label), mean
                   over all N*K elements, positives weighted by pos_weight (PyTorch's
                   BCEWithLogitsLoss); accuracy: rows whose every label is right
"""
import numpy as np

from . import kernels

UNWEIGHTED = np.zeros(0, np.float32)  # the kernels' "no row weights"


def _rows(w):
    """Row weights for a kernel: (N,) in the data's dtype, or the empty array for none."""
    return UNWEIGHTED if w is None else w


class CrossEntropy:
    """Softmax cross-entropy; with class_weight, each row's loss weighted by its class's weight
    and the mean taken over the weights (torch's CrossEntropyLoss(weight=...))."""
    name = "cross_entropy"
    integer_labels = True

    def __init__(self, class_weight=(), dtype=np.float32):
        self.class_weight = tuple(float(w) for w in class_weight)
        self.weights = np.array(self.class_weight, dtype)  # empty: unweighted
        self.weighted = bool(self.class_weight)  # the mean is over row weights, not rows

    def row_weights(self, y):
        """The weight of each row of labels y, or None when unweighted."""
        return self.weights[y] if self.class_weight else None

    def grad_(self, out, y, out_act, scale, w=None):
        """Raw outputs (logits) -> scale * dLoss/dz in place; (loss sum, correct) over the rows.
        w: the rows' own weights (--weight-key), or None."""
        loss, correct = kernels.cross_entropy_grad_(out, y, scale, self.weights, _rows(w))
        return float(loss), int(correct)

    def fused_step(self, grads, params, x, y, scale, ws, drop, rows, bound, w=None):
        """Forward, loss and backward in one compiled call (the data-parallel hot path); bound:
        ws.bound to have the kernel bound the gradient, or model.NO_BOUND."""
        return kernels.train_step_ce(grads, params, x, y, scale, self.weights, _rows(w),
                                     ws.sizes, ws.w_off, ws.b_off, ws.acts, ws.pre, ws.a_off,
                                     ws.act, ws.d0, ws.d1, drop, rows, ws.units, bound)

    @staticmethod
    def scale(global_rows, n_outputs):
        """Factor on the summed per-row losses that makes the global mean loss (global_rows: the
        batch's rows, or with weights the sum of its rows' weights)."""
        return 1.0 / global_rows

    @staticmethod
    def summarize(loss_sum, correct, n, n_outputs, weight=None):
        """(mean loss, accuracy) from sums over n rows (of these weights, when weighted)."""
        return loss_sum / max(n if weight is None else weight, 1e-300), correct / max(n, 1)

    @staticmethod
    def outputs_(out):
        """Raw outputs -> what predict reports (probabilities), in place."""
        kernels.softmax_(out)
        return out


class _PerElement:
    """What mse and bce share: float targets (N, K), a mean over all N*K elements (over the
    rows' own weights times K when the rows carry them), no weights of their own per label."""
    integer_labels = False
    weighted = False

    @staticmethod
    def scale(global_rows, n_outputs):
        return 1.0 / (global_rows * n_outputs)

    @staticmethod
    def row_weights(y):
        return None

    @staticmethod
    def mean(loss_sum, n, n_outputs, weight):
        return loss_sum / (max(n if weight is None else weight, 1e-300) * n_outputs)


class MeanSquaredError(_PerElement):
    name = "mse"

    @staticmethod
    def grad_(out, y, out_act, scale, w=None):
        loss, correct = kernels.mse_grad_(out, y, out_act, scale, _rows(w))
        return float(loss), int(correct)

    @staticmethod
    def fused_step(grads, params, x, y, scale, ws, drop, rows, bound, w=None):
        return kernels.train_step_mse(grads, params, x, y, scale, _rows(w), ws.sizes, ws.w_off,
                                      ws.b_off, ws.acts, ws.pre, ws.a_off, ws.act, ws.out_act,
                                      ws.d0, ws.d1, drop, rows, ws.units, bound)

    def summarize(self, loss_sum, correct, n, n_outputs, weight=None):
        return self.mean(loss_sum, n, n_outputs, weight), None

    @staticmethod
    def outputs_(out):
        return out


class BinaryCrossEntropy(_PerElement):
    name = "bce"

    def __init__(self, pos_weight=(), dtype=np.float32):
        self.pos_weight, self.dtype = tuple(float(p) for p in pos_weight), dtype
        self._weights = {}

    def weights(self, k):
        """pos_weight as an array of the K outputs (one value is every output's), in the
        network's dtype."""
        if k not in self._weights:
            given = self.pos_weight or (1.0,)
            self._weights[k] = np.array(given * (k if len(given) == 1 else 1), self.dtype)
        return self._weights[k]

    def grad_(self, out, y, out_act, scale, w=None):
        loss, correct = kernels.bce_grad_(out, y, self.weights(out.shape[1]), scale, _rows(w))
        return float(loss), int(correct)

    def fused_step(self, grads, params, x, y, scale, ws, drop, rows, bound, w=None):
        return kernels.train_step_bce(grads, params, x, y, scale, self.weights(ws.sizes[-1]),
                                      _rows(w), ws.sizes, ws.w_off, ws.b_off, ws.acts, ws.pre,
                                      ws.a_off, ws.act, ws.d0, ws.d1, drop, rows, ws.units, bound)

    def summarize(self, loss_sum, correct, n, n_outputs, weight=None):
        return self.mean(loss_sum, n, n_outputs, weight), correct / max(n, 1)

    @staticmethod
    def outputs_(out):
        """Logits -> the probability of each label, in place."""
        kernels.sigmoid_(out)
        return out


LOSSES = {loss.name: loss for loss in (CrossEntropy(), MeanSquaredError(), BinaryCrossEntropy())}
