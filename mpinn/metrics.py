"""Task metrics (--metrics), named as scikit-learn names them and equal to scikit-learn's on the
same predictions (tests/test_metrics.py): pure functions of the labels or targets and the network's
outputs of a whole evaluation set, in float64.

How they are exact over ranks: the ranks' outputs and labels are gathered to rank 0 (session.py,
one Gatherv each), which computes every metric from all rows at once and broadcasts the results.
The ranking metrics (ROC AUC, average precision) need the scores' order across all rows, which
neither a sum of per-rank figures (Lightning#4783) nor per-rank averages (torchmetrics#1297) give.
Rank 0 holds rows x outputs floats for it: 40 MB for a million rows of 10 classes.

Classification (integer labels, class probabilities):
    accuracy, log_loss (probabilities clipped to [eps, 1 - eps], as scikit-learn does),
    precision, recall, f1 (per class, and their macro and support-weighted means; 0 where a
    class is never predicted or never present: zero_division=0), confusion_matrix (rows: true
    class, columns: predicted), roc_auc (binary: of class 1's probability; K classes: the macro
    mean of one-vs-rest), average_precision (binary; K classes: macro one-vs-rest)
    Every class of the network counts (scikit-learn's labels=range(K)).
Regression (targets, outputs; in the targets' own units):
    mae, rmse, r2: per output and their plain mean (scikit-learn's uniform_average; an output that
    never varies has r2 1 if predicted exactly, else 0, as force_finite does)
"""
import numpy as np

from .errors import UsageError

CLASSIFICATION = ("accuracy", "log_loss", "precision", "recall", "f1", "confusion_matrix",
                  "roc_auc", "average_precision")
REGRESSION = ("mae", "rmse", "r2")
# lower is better for these; higher for the rest (what --monitor needs to know)
LOWER_IS_BETTER = ("log_loss", "mae", "rmse")
RANKING = ("roc_auc", "average_precision")  # need both sides of every class in the labels
# the validation figures --monitor may name, with the direction that is better (a metric's
# headline: macro or mean; the confusion matrix has none)
MONITORED = {"val_loss": "min", "val_accuracy": "max",
             **{f"val_{n}": "min" if n in LOWER_IS_BETTER else "max"
                for n in CLASSIFICATION + REGRESSION if n not in ("accuracy", "confusion_matrix")}}


def parse_names(text):
    """'accuracy, f1' -> ('accuracy', 'f1'); an unknown name is a UsageError."""
    names = tuple(n.strip() for n in str(text).split(",") if n.strip())
    unknown = [n for n in names if n not in CLASSIFICATION + REGRESSION]
    if unknown:
        raise UsageError(f"--metrics: unknown metric {unknown[0]!r}; choose from "
                         f"{', '.join(CLASSIFICATION + REGRESSION)}")
    return names


def check_names(names, integer_labels, binary_outputs=0):
    """Every metric must fit the loss: classification metrics need labels (class labels, or the
    0/1 targets of one bce output), regression ones targets."""
    if binary_outputs > 1 and names:
        raise UsageError(f"--metrics {names[0]}: the task metrics of a multi-label network "
                         f"({binary_outputs} bce outputs) are not computed yet; one bce output "
                         "(binary) takes the classification metrics")
    fits = CLASSIFICATION if integer_labels or binary_outputs else REGRESSION
    wrong = [n for n in names if n not in fits]
    if wrong:
        kind = ("class labels (cross_entropy)" if integer_labels else "0/1 targets (bce)"
                if binary_outputs else "regression targets (mse)")
        raise UsageError(f"--metrics {wrong[0]} does not fit a network of {kind}; it takes "
                         f"{', '.join(fits)}")


def check_classes(names, labels, n_classes, path):
    """The ranking metrics need every class both present and absent among the labels."""
    present = np.unique(labels)
    ranking = [n for n in names if n in RANKING]
    if ranking and (len(present) < 2 or (n_classes > 2 and len(present) < n_classes)):
        missing = sorted(set(range(n_classes)) - set(present.tolist()))
        raise UsageError(f"--metrics {ranking[0]} needs every class among the labels of {path}; "
                         f"class{'es' if len(missing) > 1 else ''} "
                         f"{', '.join(map(str, missing[:10]))} never occur"
                         + (" (it holds one class only)" if len(present) < 2 else ""))


def compute(names, y, outputs, integer_labels, binary=False):
    """{name: value} for the named metrics of all rows (y: labels or targets; outputs: class
    probabilities or regression outputs, rows x K; binary: one bce output's 0/1 targets and
    probability, taken as the two classes 0 and 1)."""
    outputs = np.asarray(outputs, np.float64)
    if binary:
        p = outputs.reshape(-1)
        return _classification(names, (np.asarray(y).reshape(-1) > 0.5).astype(np.int64),
                               np.column_stack([1 - p, p]))
    if integer_labels:
        return _classification(names, np.asarray(y, np.int64), outputs)
    y = np.asarray(y, np.float64).reshape(outputs.shape)
    return _regression(names, y, outputs)


def _classification(names, y, prob):
    k = prob.shape[1]
    pred = prob.argmax(1)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    tp, predicted, support = np.diag(cm), cm.sum(0), cm.sum(1)
    per_class = {"precision": _ratio(tp, predicted), "recall": _ratio(tp, support),
                 "f1": _ratio(2 * tp, predicted + support)}
    out = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(tp.sum() / max(len(y), 1))
        elif name == "log_loss":
            eps = np.finfo(prob.dtype).eps
            p = np.clip(prob[np.arange(len(y)), y], eps, 1 - eps)
            out[name] = float(-np.log(p).mean())
        elif name in per_class:
            v = per_class[name]
            out[name] = {"macro": float(v.mean()),
                         "weighted": float((v * support).sum() / max(support.sum(), 1)),
                         "per_class": v.tolist()}
        elif name == "confusion_matrix":
            out[name] = cm.tolist()
        elif name in RANKING:
            score = roc_auc if name == "roc_auc" else average_precision
            if k == 2:
                out[name] = score(y == 1, prob[:, 1])
            else:
                out[name] = float(np.mean([score(y == c, prob[:, c]) for c in range(k)]))
    return out


def _ratio(a, b):
    return np.divide(a, b, out=np.zeros(len(a)), where=b > 0)


def roc_auc(positive, score):
    """Area under the ROC curve: the Mann-Whitney statistic with tied scores counted half (the
    trapezoids scikit-learn sums)."""
    ranks = _midranks(score)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _midranks(a):
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(len(a))
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2
    return ranks


def average_precision(positive, score):
    """sum over thresholds (recall_n - recall_{n-1}) precision_n, a threshold at each distinct
    score, highest first (scikit-learn's step-wise integral, no interpolation)."""
    order = np.argsort(-score, kind="mergesort")
    s, hit = score[order], positive[order].astype(np.float64)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # the end of each tie group
    tps = np.cumsum(hit)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _regression(names, y, out):
    err = y - out
    mse = (err ** 2).mean(0)
    total = ((y - y.mean(0)) ** 2).sum(0)
    resid = (err ** 2).sum(0)
    r2 = np.where(total > 0, 1 - resid / np.where(total > 0, total, 1),
                  np.where(resid == 0, 1.0, 0.0))
    per_output = {"mae": np.abs(err).mean(0), "rmse": np.sqrt(mse), "r2": r2}
    return {name: {"mean": float(per_output[name].mean()),
                   "per_output": per_output[name].tolist()} for name in names}


def headline(name, value):
    """The one number of a metric for a log line, TensorBoard and --monitor (macro or mean), or
    None (the confusion matrix)."""
    if isinstance(value, dict):
        return value.get("macro", value.get("mean"))
    return None if isinstance(value, list) else value
