"""The Python API, for scripts and notebooks.

    import mpinn
    result = mpinn.fit(data="train.h5", hidden="256,128", epochs=5, run_dir="runs/a")
    result.metrics, result.history               # the last epoch's figures, every epoch's
    result = mpinn.fit(..., hooks=[MyHook()])  # subclasses of mpinn.Hook see the loop's events
    model = mpinn.load(result.checkpoint)         # or any checkpoint.h5
    labels = model.predict(x)                     # NumPy in, NumPy out, in this process
    probabilities = model.predict_proba(x)        # (classification)
    loss, accuracy = model.evaluate(x, y)

fit() takes the options of `mpinn train` as keywords (and/or a TOML file as `config`), checked as
the command line checks them (an unknown keyword gets a did-you-mean; errors name keywords, not
flags), quiet unless verbose=True, and trains exactly as `mpinn train` does: on one process, or
under `mpirun -n N python script.py` over all N ranks (every rank calls fit with the same
options).
Importing mpinn starts no MPI; fit() does, the first time it runs. load(), predict() and
evaluate() never use MPI.
"""
import os
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint
from .config import TrainConfig, from_options
from .errors import AgreedExit, RunError, UsageError
from .hooks import Hook
from .model import Network
from .options import in_python
from .runtime.launch import mis_launch


@dataclass
class FitResult:
    checkpoint: str   # the run's final checkpoint (written by rank 0)
    steps: int        # optimizer steps made in all (counting resumed ones)
    rank: int         # this process's rank, and the world's size
    size: int
    history: list = field(default_factory=list)  # each epoch's record of this call, as in
    #                                              metrics.jsonl (loss, accuracy, val_loss, ...)

    @property
    def metrics(self):
        """The last epoch's record (an empty dict when no epoch ran)."""
        return self.history[-1] if self.history else {}

    def model(self):
        """The trained network, loaded from the final checkpoint."""
        return load(self.checkpoint)


class History(Hook):
    """Each epoch's record, on every rank (the records are the same on all of them)."""

    def __init__(self):
        self.records = []

    def on_epoch_end(self, state, record):
        self.records.append({k: v.item() if isinstance(v, np.generic) else v
                             for k, v in record.items()})


def fit(config=None, hooks=(), verbose=False, **options):
    """Train as `mpinn train` would with these options; returns a FitResult with each epoch's
    figures. `hooks`: your own mpinn.Hook objects, called at the loop's events (after the run's
    own metrics and validation, before its checkpoint: see hooks.py). verbose: print what `mpinn
    train` prints (rank 0). Bad options raise UsageError before MPI starts; a failure during
    the run (reported on stderr by the rank that saw it) raises RunError on every rank."""
    try:
        return _fit(config, hooks, verbose, options)
    except (UsageError, RunError) as e:  # said for a Python caller: keywords, not flags
        e.args = (in_python(str(e), TrainConfig),)
        raise


def _fit(config, hooks, verbose, options):
    cfg, explicit = from_options(TrainConfig, config, "mpinn.fit", **options)
    from . import train
    from .comm import Comm  # MPI starts here, once the options are known to be good
    from .rundir import RunDir
    comm = Comm()
    comm.debug = cfg.debug
    problem = mis_launch(comm.size, os.environ, comm.library_version())
    if problem:
        raise UsageError(problem)
    history = History()
    try:
        engine = train.run(cfg, explicit, comm, [*hooks, history], quiet=not verbose).engine
    except AgreedExit as e:
        raise RunError(e.message or "training stopped (the reason is printed above)",
                       e.code) from None
    return FitResult(RunDir(cfg.run_dir).checkpoint, engine.optimizer.t, comm.rank, comm.size,
                     history.records)


def load(path):
    """A trained network from a checkpoint file, ready to predict in this process."""
    return Model(checkpoint.load(str(path)))


class Model:
    """A network with its weights: `arch` (sizes, activations, loss), `params` (one flat buffer,
    float32 unless trained with --dtype float64), and predictions in chunks of at most
    `batch_size` rows."""

    def __init__(self, ckpt, batch_size=4096):
        self.arch, self.params, self.batch_size = ckpt.arch, ckpt.params, batch_size
        self.config = ckpt.config
        self.scaling = ckpt.scaling  # applied to x (and y, outputs) as training applied it
        names = self.config.get("class_names")
        # what predict answers with for a classifier: the class names the data had, else 0..K-1
        self.classes_ = (np.array(names) if names else np.arange(self.arch.sizes[-1])
                         if self.arch.loss == "cross_entropy" else None)
        self._net = Network(self.arch, self.params, batch_size)

    def _chunks(self, x):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.arch.sizes[0]:
            raise ValueError(f"x must be (rows, {self.arch.sizes[0]}); got shape {x.shape}")
        for start in range(0, len(x), self.batch_size):
            # a copy of the chunk in the network's dtype: scaled in place, the caller's array
            # left as it is
            yield start, self.scaling.inputs_(np.array(x[start:start + self.batch_size],
                                                       self.arch.float, order="C"))

    def predict_proba(self, x):
        """What `mpinn predict` writes as prob/output for the rows of x, (rows, K): class
        probabilities (cross-entropy), a probability per label (bce), outputs in the targets'
        units (mse)."""
        out = np.empty((len(x), self.arch.sizes[-1]), self.arch.float)
        for start, chunk in self._chunks(x):
            out[start:start + len(chunk)] = self._net.forward(chunk)
        return self.scaling.outputs_(out)

    def predict(self, x):
        """The prediction for each row of x: its class (the class name when the training data
        had names: `classes_`), its 0/1 labels (bce, (rows, K) int8), or its outputs (mse)."""
        out = self.predict_proba(x)
        if self.arch.loss == "cross_entropy":
            return self.classes_[out.argmax(1)]
        if self.arch.loss == "bce":
            return (out > 0.5).astype(np.int8)
        return out

    def evaluate(self, x, y):
        """(mean loss, accuracy or None) over the rows of x, as `mpinn evaluate` reports them."""
        integer = self.arch.loss_fn.integer_labels
        y = np.asarray(y, np.int64) if integer else self.scaling.targets_(
            np.array(y, self.arch.float).reshape(len(y), -1))
        loss_sum = correct = 0.0
        for start, chunk in self._chunks(x):
            l, c = self._net.loss_sums(chunk, np.ascontiguousarray(y[start:start + len(chunk)]))
            loss_sum, correct = loss_sum + l, correct + c
        weights = self.arch.loss_fn.row_weights(y)
        total = None if weights is None else weights.sum(dtype=np.float64)
        return self.arch.loss_fn.summarize(loss_sum, correct, len(x), self.arch.sizes[-1], total)
