"""The network: layer sizes -> one flat parameter buffer, one flat gradient buffer, per-layer views,
seeded initialisation, and the preallocated workspace the kernels write into.

Layout (shared with kernels.py and the checkpoint format): W0, b0, W1, b1, ... with W of shape
(fan_in, fan_out), so a pipeline stage's parameters are one contiguous slice of the flat buffer.
"""
import functools
import time
from dataclasses import dataclass

import numpy as np

from . import kernels
from .errors import UsageError
from .losses import LOSSES, BinaryCrossEntropy, CrossEntropy


DTYPES = ("float32", "float64")  # --dtype: float32 unless asked


@dataclass(frozen=True)
class Architecture:
    """What defines a network: sizes (F, hidden..., K), activations and loss."""
    sizes: tuple
    activation: str = "relu"
    output_activation: str = "identity"
    loss: str = "cross_entropy"
    pos_weight: tuple = ()  # bce: the weight of positive targets, one, or one per output
    class_weight: tuple = ()  # cross_entropy: the weight of each class's rows
    slope: float = 0.01  # leaky_relu's slope for negative inputs
    dtype: str = "float32"  # what parameters, data and every sum of training are held in

    def __post_init__(self):
        if len(self.sizes) < 2 or any(int(s) < 1 for s in self.sizes):
            raise UsageError(
                f"layer sizes must be positive and at least input,output; got {self.sizes}"
            )
        if self.activation not in kernels.ACTIVATIONS:
            raise UsageError(f"unknown activation {self.activation!r}; expected one of "
                             f"{', '.join(kernels.ACTIVATIONS)}")
        outputs = [a for a in kernels.ACTIVATIONS if not kernels.needs_pre_activation(a)]
        if self.output_activation not in outputs:  # mse's gradient is written from the output
            raise UsageError(f"unknown output activation {self.output_activation!r}; expected one "
                             f"of {', '.join(outputs)}")
        if self.loss not in LOSSES:
            raise UsageError(f"unknown loss {self.loss!r}; expected one of {', '.join(LOSSES)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype takes {' or '.join(DTYPES)}, got {self.dtype!r}")
        if not self.slope > 0:
            raise UsageError(f"--leaky-slope must be positive, got {self.slope}")
        if self.activation != "leaky_relu":  # the slope of no leaky_relu: one network, one value
            object.__setattr__(self, "slope", 0.01)
        if self.loss != "mse" and self.output_activation != "identity":
            raise UsageError("--output-activation applies to --loss mse only (cross_entropy "
                             "applies softmax itself, bce a sigmoid per output)")
        if self.pos_weight and self.loss != "bce":
            raise UsageError("--pos-weight weights the positive targets of --loss bce")
        if self.class_weight and (self.loss != "cross_entropy"
                                  or len(self.class_weight) != self.sizes[-1]
                                  or min(self.class_weight) < 0 or not max(self.class_weight) > 0):
            raise UsageError(f"--class-weight takes one weight per class of a cross_entropy "
                             f"network ({self.sizes[-1]} classes), none negative and not all 0; "
                             f"got {','.join(map(str, self.class_weight))}")
        if len(self.pos_weight) not in (0, 1, self.sizes[-1]) or any(
                not p > 0 for p in self.pos_weight):
            raise UsageError(f"--pos-weight takes one positive weight or one per output "
                             f"({self.sizes[-1]}); got {','.join(map(str, self.pos_weight))}")

    @functools.cached_property
    def loss_fn(self):
        """The loss object (losses.py) this network trains with."""
        if self.pos_weight:
            return BinaryCrossEntropy(self.pos_weight, self.float)
        if self.class_weight:
            return CrossEntropy(self.class_weight, self.float)
        return LOSSES[self.loss]

    @property
    def n_layers(self):
        return len(self.sizes) - 1

    @property
    def float(self):
        """The numpy dtype of the network's numbers."""
        return np.dtype(self.dtype)

    @functools.cached_property  # read on every step
    def n_params(self):
        return sum(fi * fo + fo for fi, fo in zip(self.sizes[:-1], self.sizes[1:]))

    def offsets(self):
        """(w_off, b_off) int64 arrays: where W_l and b_l start in the flat buffer."""
        return offsets(self.sizes)

    def describe(self):
        return "-".join(str(s) for s in self.sizes)

    def training_bytes(self, max_rows, n_state, stages=1):
        """About what training holds per rank, in bytes: parameters, gradients (and the copy the
        engine starts from), optimizer state, and a workspace of max_rows rows. A
        pipeline stage holds about 1/stages of the parameters. gelu, gelu_tanh and silu keep each
        layer's z beside its output."""
        params = self.n_params / stages * (3 + n_state)
        kept = 2 if kernels.needs_pre_activation(self.activation) else 1
        rows = max_rows * (self.sizes[0] + kept * sum(self.sizes[1:])
                           + 2 * max(self.sizes[:-1]))
        return self.float.itemsize * (params + rows)


def layer_views(arch, flat):
    """[(W_l, b_l)] views into a flat buffer laid out as `arch` says."""
    w_off, b_off = arch.offsets()
    views = []
    for l, (fi, fo) in enumerate(zip(arch.sizes[:-1], arch.sizes[1:])):
        views.append(
            (flat[w_off[l] : w_off[l] + fi * fo].reshape(fi, fo), flat[b_off[l] : b_off[l] + fo])
        )
    return views


WEIGHT_INITS = ("he", "glorot")


def init_params(arch, seed, scheme="he"):
    """Zero biases and weights drawn from the seed (rank-free), in the network's dtype: "he",
    He-normal before ReLU and Xavier-uniform otherwise; "glorot", Xavier/Glorot-uniform
    everywhere (scikit-learn's and Keras's choice)."""
    rng = np.random.default_rng(seed)
    flat = np.zeros(arch.n_params, arch.float)
    for l, (W, _) in enumerate(layer_views(arch, flat)):
        fi, fo = W.shape
        is_output = l == arch.n_layers - 1
        if scheme == "he" and arch.activation == "relu" and not is_output:
            W[...] = rng.normal(0.0, np.sqrt(2.0 / fi), size=(fi, fo))
        else:
            bound = np.sqrt(6.0 / (fi + fo))
            W[...] = rng.uniform(-bound, bound, size=(fi, fo))
    return flat


def tensor_spans(sizes):
    """[(lo, hi, adapted)] of each tensor in the flat buffer of these layer sizes, in order: a
    weight matrix is adapted by LARS/LAMB's trust ratio, a bias is not (optim.Tensors)."""
    w_off, b_off = offsets(sizes)
    spans = []
    for l, fo in enumerate(sizes[1:]):
        spans += [(int(w_off[l]), int(b_off[l]), True), (int(b_off[l]), int(b_off[l]) + fo, False)]
    return spans


def offsets(sizes):
    """(w_off, b_off) int64 arrays: where W_l and b_l start in a flat buffer for these sizes."""
    w_off, b_off, o = [], [], 0
    for fi, fo in zip(sizes[:-1], sizes[1:]):
        w_off.append(o)
        b_off.append(o + fi * fo)
        o += fi * fo + fo
    return np.array(w_off, np.int64), np.array(b_off, np.int64)


class Workspace:
    """Preallocated buffers for up to max_rows rows through consecutive layers of `sizes`: each
    layer's output (acts), back-propagation scratch (d0, d1), and for a pipeline stage its input
    and the gradient it sends back (x_in, dx). `out_act` is the last layer's activation: the
    network's output activation, or the hidden activation when a later stage follows."""

    def __init__(self, sizes, activation, out_activation, max_rows, dtype=np.float32,
                 stage_input=False, unit0=0, slope=0.01):
        sizes = tuple(int(s) for s in sizes)
        # where each layer's input units start in the network's unit numbering (kernels: dropout)
        self.units = unit0 + np.cumsum((0,) + sizes, dtype=np.int64)
        self.max_rows = max(int(max_rows), 1)
        widths = sizes[1:]
        self.a_off = np.cumsum([0] + [self.max_rows * w for w in widths[:-1]]).astype(np.int64)
        self.acts = np.zeros(self.max_rows * sum(widths), dtype)
        scratch = self.max_rows * max(sizes[:-1])
        self.d0 = np.zeros(scratch, dtype)
        self.d1 = np.zeros(scratch, dtype)
        self.sizes = np.array(sizes, np.int64)
        self.w_off, self.b_off = offsets(sizes)
        self.act = kernels.activation(activation, slope)
        self.out_act = kernels.activation(out_activation, slope)
        # z of each layer, where an activation's derivative needs it (kernels.py)
        self.out_needs_pre = kernels.needs_pre_activation(out_activation)
        self.pre = np.zeros(self.acts.size if kernels.needs_pre_activation(activation)
                            or self.out_needs_pre else 0, dtype)
        self.x_in = np.zeros(self.max_rows * sizes[0], dtype) if stage_input else None
        self.dx = np.zeros(self.max_rows * sizes[0], dtype) if stage_input else None
        # the last backward pass's bound on |gradient| (kernels.backward_layers)
        self.bound = np.zeros(1, np.float64)

    @property
    def nbytes(self):
        """Activation memory this workspace holds (outputs, scratch, stage input and gradient)."""
        return sum(a.nbytes for a in (self.acts, self.pre, self.d0, self.d1, self.x_in, self.dx)
                   if a is not None)

    def output(self, n):
        """The last layer's (n, K) slot in the workspace."""
        k = int(self.sizes[-1])
        o = self.a_off[-1]
        return self.acts[o:o + n * k].reshape(n, k)

    def pre_output(self, n):
        """The last layer's z (n, K), kept when out_act's derivative needs it."""
        k = int(self.sizes[-1])
        o = self.a_off[-1]
        return self.pre[o:o + n * k].reshape(n, k)

    def input(self, n):
        f = int(self.sizes[0])
        return self.x_in[:n * f].reshape(n, f)

    def input_grad(self, n):
        f = int(self.sizes[0])
        return self.dx[:n * f].reshape(n, f)


NO_DROPOUT = np.zeros(3, np.uint64)
NO_ROWS = np.zeros(0, np.int64)
NO_BOUND = np.zeros(0, np.float64)  # the kernels skip the gradient bound


class Dropout:
    """Inverted dropout with probability p on hidden outputs (kernels.py says how masks are made):
    `for_update(t)` is the kernels' `drop` argument for optimizer update t."""

    def __init__(self, p, seed, last_hidden=False):
        self.p, self.seed, self.last_hidden = float(p), int(seed), bool(last_hidden)
        self.threshold = np.uint64(min(int(self.p * 2.0**64), 2**64 - 1))

    def for_update(self, t):
        if self.p == 0:
            return NO_DROPOUT
        return np.array([self.threshold, kernels.dropout_key(self.seed, t), self.last_hidden],
                        np.uint64)


class Layers:
    """Consecutive dense layers over one flat parameter buffer (a whole network, or a pipeline
    stage's contiguous slice of it) and the kernel calls that run them on a Workspace. Gradients go
    to `grads` (its own buffer unless one is given) or to a buffer the caller names. unit0: where
    the input's units start in the whole network's numbering (a stage's first layer's input)."""

    def __init__(self, sizes, activation, out_activation, params, grads=None, unit0=0,
                 slope=0.01):
        self.sizes = tuple(int(s) for s in sizes)
        self.activation, self.out_activation, self.slope = activation, out_activation, slope
        self.params = np.ascontiguousarray(params)
        self.grads = np.zeros_like(self.params) if grads is None else grads
        self.unit0 = int(unit0)

    @property
    def n_layers(self):
        return len(self.sizes) - 1

    def workspace(self, max_rows, stage_input=False):
        return Workspace(self.sizes, self.activation, self.out_activation, max_rows,
                         self.params.dtype, stage_input, self.unit0, self.slope)

    def forward(self, ws, x, drop=NO_DROPOUT, rows=NO_ROWS):
        """The last layer's output for the rows of x: a view into ws, valid until ws is reused.
        drop/rows: dropout for training (Dropout.for_update, the rows' file row numbers)."""
        kernels.forward(self.params, x, ws.sizes, ws.w_off, ws.b_off, ws.acts, ws.pre, ws.a_off,
                        ws.act, ws.out_act, drop, rows, ws.units)
        return ws.output(x.shape[0])

    def backward(self, ws, x, grads=None, dx=None, hi=None, lo=0, drop=NO_DROPOUT, rows=NO_ROWS):
        """Backpropagate the dLoss/dz left in ws's output slot through layers hi-1 .. lo (default:
        all), writing their gradients into grads (default self.grads). With dx (a pipeline stage
        after the first), dx receives dLoss/dz of the layer that produced x (dLoss/dh when its
        activation's derivative needs z: then the stage before finishes it, as this one does
        here with what the next stage sent)."""
        if ws.out_needs_pre and (hi is None or hi == self.n_layers):
            n = x.shape[0]
            kernels.output_act_grad_(ws.output(n), ws.pre_output(n), ws.out_act, drop, rows,
                                     ws.units[self.n_layers])  # where its output units start
        kernels.backward_layers(self.grads if grads is None else grads, self.params, x, ws.sizes,
                                ws.w_off, ws.b_off, ws.acts, ws.pre, ws.a_off, ws.act, ws.d0, ws.d1,
                                x if dx is None else dx, dx is not None,
                                self.n_layers if hi is None else hi, lo, drop, rows, ws.units,
                                NO_BOUND)


class Network:
    """A whole network: its layers over the flat parameter and gradient buffers, one workspace, and
    its loss object."""

    def __init__(self, arch, params, max_rows, grads=None):
        """grads: an optional preallocated buffer (a view the engine reduces together with a few
        control values); a new one by default."""
        self.arch, self.loss = arch, arch.loss_fn
        self.layers = Layers(arch.sizes, arch.activation, arch.output_activation, params, grads,
                             slope=arch.slope)
        self.params, self.grads = self.layers.params, self.layers.grads
        self.ws = self.layers.workspace(max_rows)
        # the gradient bound reads each layer's input and dLoss/dz: 2 * rows * sum(sizes) values,
        # in cache; up to this many rows that is fewer than the gradient it spares reading
        self.bound_rows = arch.n_params // (2 * sum(arch.sizes))

    @property
    def grad_bound(self):
        """No element of the last gradient train_step computed exceeds this in magnitude (inf:
        unknown); below kernels.CERTAIN_FINITE the gradient is finite."""
        return float(self.ws.bound[0])

    def use_grads(self, grads):
        """Write gradients into this buffer from now on (a node's alternating shared slots)."""
        self.grads = self.layers.grads = grads

    def train_step(self, x, y, scale, grads=None, drop=NO_DROPOUT, rows=NO_ROWS, w=None):
        """Gradient of scale * (sum of losses over the rows of x, each weighted by w when given)
        into self.grads (or grads). Returns (loss sum, correct count) over those rows."""
        if x.shape[0] > self.ws.max_rows:
            raise ValueError(f"{x.shape[0]} rows exceed the workspace of {self.ws.max_rows}")
        if x.shape[0] <= self.bound_rows:
            bound = self.ws.bound
        else:
            bound = NO_BOUND
            self.ws.bound[0] = np.inf  # unknown
        loss, correct = self.loss.fused_step(self.grads if grads is None else grads, self.params,
                                             x, y, self.params.dtype.type(scale), self.ws, drop,
                                             rows, bound, w)
        return float(loss), int(correct)

    def forward_loss_grad(self, x, y, scale, drop=NO_DROPOUT, rows=NO_ROWS, w=None):
        """Forward pass and loss for the rows of x (at least one), leaving scale * dLoss/dz of
        the output layer in the workspace for backward. Returns (loss sum, correct count)."""
        out = self.layers.forward(self.ws, x, drop, rows)
        return self.loss.grad_(out, y, self.ws.out_act, self.params.dtype.type(scale), w)

    def backward(self, x, hi=None, lo=0, drop=NO_DROPOUT, rows=NO_ROWS):
        """Backpropagate what forward_loss_grad left (layers hi-1 .. lo; default all)."""
        self.layers.backward(self.ws, x, hi=hi, lo=lo, drop=drop, rows=rows)

    def train_step_traced(self, x, y, scale, timeline, drop=NO_DROPOUT, rows=NO_ROWS, w=None):
        """train_step with forward and backward as separate kernel calls (same mathematics),
        recorded on the timeline."""
        self.ws.bound[0] = np.inf  # not computed on this path
        if x.shape[0] == 0:
            self.grads[:] = 0
            return 0.0, 0
        t0 = time.perf_counter()
        loss, correct = self.forward_loss_grad(x, y, scale, drop, rows, w)
        t1 = time.perf_counter()
        self.backward(x, drop=drop, rows=rows)
        timeline.add("forward", t0, t1)
        timeline.add("backward", t1, time.perf_counter())
        return loss, correct

    def warmup(self, x, y):
        """Compile (or load from cache) the kernels for these dtypes on one row, outside any timing;
        leaves parameters untouched and gradients zero."""
        self.train_step(x[:1], y[:1], 1.0)
        self.loss_sums(x[:1], y[:1])
        self.grads[:] = 0

    def raw_outputs(self, x):
        """Raw outputs (logits, or out_act(z) for mse) of the rows of x (at most max_rows): a view
        into the workspace, valid until the next call."""
        return self.layers.forward(self.ws, x)

    def forward(self, x):
        """Outputs for the rows of x (at most max_rows): a view into the workspace, valid until the
        next call. Softmax probabilities for cross-entropy, out_act(z) for mse."""
        return self.loss.outputs_(self.raw_outputs(x))

    def loss_sums(self, x, y):
        """(loss sum, correct count) over the rows of x, without touching the gradients."""
        if x.shape[0] == 0:
            return 0.0, 0
        return self.loss.grad_(self.raw_outputs(x), y, self.ws.out_act, 1.0)
