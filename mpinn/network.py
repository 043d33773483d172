"""The network a run trains: its class count (the checkpoint's, --classes, the stored class names,
or the labels), its architecture (fresh from the model section, or the checkpoint's, which
explicit options may not contradict), whether it fits the node's memory, and its class names."""
import numpy as np

from . import data
from .errors import UsageError, raise_usage
from .losses import LOSSES
from .model import Architecture
from .optim import STATE_BUFFERS
from .runtime.process import available_memory_bytes
from .session import check_labels

EVAL_ROWS = 1024  # rows per forward pass when evaluating


def build(options, explicit, comm, grid, ckpt, inputs):
    """The architecture to train (the checkpoint's, or from the model section with the data's
    class count), checked against this node's memory."""
    loss = ckpt.arch.loss if ckpt else options.model.loss
    n_outputs = (class_count(comm, options, ckpt, inputs.y, inputs.train_path,
                             lambda: inputs.cols.file_rows(inputs.plan.owned_rows()))
                 if LOSSES[loss].integer_labels else inputs.n_targets)
    weights = (class_weights(comm, options.model.class_weight, inputs.y, n_outputs)
               if LOSSES[loss].integer_labels else ())
    arch = comm.checked(architecture, options.model, explicit, ckpt, inputs.n_features, n_outputs,
                        weights)
    most = -(-int(inputs.plan.local_counts().max()) // options.parallel.accumulate)
    comm.checked(check_memory, options.optim.optimizer, arch, grid, most, comm.node_size())
    return arch


def names_of_classes(comm, options, saved_config, inputs, arch):
    """The class names a checkpoint carries (predict writes them): the start checkpoint's, else
    those stored with the training labels; None for regression or unnamed classes."""
    if not arch.loss_fn.integer_labels:
        return None
    names = (saved_config or {}).get("class_names") or comm.on_root(
        data.class_names, inputs.train_path, options.data.y_key)
    names = comm.bcast_json(names)
    return names if names and len(names) == arch.sizes[-1] else None


def regression_warning(options, ckpt, arch, n_rows, path):
    """A warning when the class count was read off integer labels and is large next to the rows
    (scikit-learn's diabetes targets, 25..346 as int64, make 347 classes for 442 rows): likely a
    regression target. None otherwise, and for classes that were given or stored by name."""
    n = arch.sizes[-1]
    if (not arch.loss_fn.integer_labels or ckpt is not None or options.model.classes
            or n < 20 or 5 * n <= n_rows or data.stored_classes(path, options.data.y_key)):
        return None
    return (f"{n} classes for {n_rows} rows: is {options.data.y_key} a regression target stored "
            "as integers? use --loss mse (and --scale-targets standard)")


def class_count(comm, options, ckpt, y, path, rows_of):
    """Classes of a cross-entropy network: the checkpoint's, --classes, the class names stored
    with the labels, else the largest label + 1 when the labels are not far sparser than that."""
    if ckpt is not None:
        n = ckpt.arch.sizes[-1]
    elif options.model.classes:
        n = options.model.classes
    else:
        n = comm.checked(data.stored_classes, path, options.data.y_key)
    local = np.unique(y) if y is not None else np.zeros(0, np.int64)
    values = np.unique(comm.allgather_ints(local))
    comm.checked(check_two_classes, values, n, path, options.data.y_key)
    if n is None:
        top = int(values.max())
        comm.checked(check_sparse_labels, y, top, values.size, path, options.data.y_key,
                     rows_of)
        n = top + 1
    comm.checked(check_labels, y, n, path, rows_of)
    return n


def check_two_classes(values, n, path, y_key):
    """A classifier needs two classes at least: one class trains to loss 0 and accuracy 1 and
    learns nothing."""
    if n is not None and n < 2:
        raise UsageError(f"{n} class: cross_entropy needs at least 2 classes (for one target "
                         "value use --loss mse)")
    if values.size == 1:
        raise UsageError(f"{path}:{y_key} holds one class only (every label is {values[0]}): a "
                         "classifier learns nothing from it; check --data and --y-key, or use "
                         "--loss mse for a regression target")


def check_sparse_labels(y, top, distinct, path, y_key, rows_of):
    if top + 1 > 10 * max(distinct, 1) and y is not None and y.size and y.max() == top:
        row = int(rows_of()[int(np.argmax(y))])
        raise UsageError(f"{path}: label {top} at row {row} of {y_key} would make {top + 1} "
                         f"classes, but the labels take only {distinct} distinct values; pass "
                         f"--classes {top + 1} if that many are meant, or fix the labels")


def check_memory(optimizer, arch, grid, max_rows, ranks_on_node):
    """Refuse a network that cannot fit before allocating it."""
    n_state = STATE_BUFFERS[optimizer] + (optimizer == "lamb")  # LAMB: a scratch buffer too
    need = arch.training_bytes(max(max_rows, EVAL_ROWS), n_state, grid.stages)
    available = available_memory_bytes()
    if available and need > available / ranks_on_node:
        gib = 2**30
        raise UsageError(f"the network {arch.describe()} needs about {need / gib:,.1f} GiB per "
                         f"rank (parameters, gradients, optimizer state, activations) but this "
                         f"node has {available / gib:,.1f} GiB available for its {ranks_on_node} "
                         "rank(s); use fewer or narrower layers, a smaller --batch-size, or more "
                         "nodes")


def class_weights(comm, given, y, n_classes):
    """--class-weight as one weight per class: '' none; 'balanced' rows / (classes x the class's
    rows) over the whole training set (scikit-learn's compute_class_weight), its counts summed
    across ranks; else the comma-separated weights as given (Architecture checks them)."""
    if not given:
        return ()
    if given != "balanced":
        try:
            return tuple(float(w) for w in given.replace(" ", "").split(",") if w)
        except ValueError:
            comm.checked(raise_usage, f"--class-weight takes 'balanced' or one number per class, "
                                  f"got {given!r}")
    counts = np.bincount(y, minlength=n_classes).astype(np.float64) if y is not None and len(
        y) else np.zeros(n_classes)
    counts = comm.allreduce_sum(counts[:n_classes])
    if counts.min() == 0:
        missing = [c for c in range(n_classes) if counts[c] == 0]
        comm.checked(raise_usage, f"--class-weight balanced: class {missing[0]} has no "
                                  f"training rows (of {n_classes} classes); give the weights "
                                  "instead")
    return tuple(float(w) for w in counts.sum() / (n_classes * counts))


def architecture(model, explicit, ckpt, n_features, n_outputs, class_weight=()):
    """The network to train: from the checkpoint (conflicting explicit options are errors) or the
    model section (and the class weights resolved from it)."""
    if ckpt is None:
        return Architecture((n_features,) + model.hidden + (n_outputs,), model.activation,
                            model.output_activation, model.loss, model.pos_weight, class_weight,
                            model.leaky_slope, model.dtype)
    arch = ckpt.arch
    given = {"hidden": model.hidden, "activation": model.activation, "loss": model.loss,
             "output_activation": model.output_activation, "pos_weight": model.pos_weight,
             "class_weight": class_weight, "leaky_slope": model.leaky_slope,
             "dtype": model.dtype}
    have = {"hidden": arch.sizes[1:-1], "activation": arch.activation, "loss": arch.loss,
            "output_activation": arch.output_activation, "pos_weight": arch.pos_weight,
            "class_weight": arch.class_weight, "leaky_slope": arch.slope, "dtype": arch.dtype}
    for key in given:
        if key in explicit and given[key] != have[key]:
            raise UsageError(
                f"--{key.replace('_', '-')} {given[key]} conflicts with the checkpoint's "
                f"{have[key]}; drop the option to use the checkpoint's architecture"
            )
    if arch.sizes[0] != n_features:
        raise UsageError(f"the checkpoint's network takes {arch.sizes[0]} input features; the data "
                         f"has {n_features}")
    if n_outputs is not None and arch.sizes[-1] != n_outputs and not arch.loss_fn.integer_labels:
        raise UsageError(f"the checkpoint's network has {arch.sizes[-1]} outputs; the data's "
                         f"targets have {n_outputs}")
    return arch
