"""Every command's options, declared once: default, help text and policy (options.py).

Each sub-command has a dataclass; cli.py turns its fields into argparse options (`batch_size` ->
`--batch-size`, booleans -> `--x/--no-x`), a TOML file given with --config supplies the same keys,
and the command line wins. Unknown keys and wrong types are UsageErrors. `mpinn train`'s options
come in typed sections (TrainOptions: data, model, optim, schedule, parallel, run, safety), each
read by the part of the run it configures; TrainConfig is their flat form at the boundary.
"""
import dataclasses
import enum
from dataclasses import dataclass

from .errors import UsageError
from .lr import SCALING_RULES, SCHEDULES
from .metrics import CLASSIFICATION, MONITORED, REGRESSION
from .metrics import parse_names as parse_metric_names
from .options import (FRACTION, NON_NEGATIVE, POSITIVE, Sections, build, check_value, flat_config,
                      from_options, load_toml, names_where, option)

__all__ = ["build", "check_value", "from_options", "load_toml"]  # the options' machinery, here too


INPUT_SCALINGS = ("none", "standard", "minmax")  # data/scaling.py fits and applies them
TARGET_SCALINGS = ("none", "standard")
ALLREDUCE_HELP = ("how data-parallel gradients are summed: auto = through each node's shared "
                  "memory where ranks share a node (MPI between nodes), mpi = MPI's Allreduce")


def parse_hidden(text):
    """'128,64' (or [128, 64]) -> (128, 64); '' -> () for a network without hidden layers."""
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = [p for p in str(text).replace(" ", "").split(",") if p]
    try:
        sizes = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise UsageError(
            f"--hidden must be comma-separated positive integers, got {text!r}"
        ) from None
    if any(s < 1 for s in sizes):
        raise UsageError(f"--hidden widths must be positive, got {text!r}")
    return sizes


def parse_ranks(text):
    """--ranks of a scaling series: items K (K ranks, placed by the launcher) or NxR (N nodes of
    R ranks) -> sorted [(ranks, ranks per node or None)]."""
    series = set()
    for item in (i.strip().lower() for i in str(text).split(",")):
        if not item:
            continue
        try:
            nodes, sep, per_node = item.partition("x")
            if sep and not per_node:
                raise ValueError(item)
            placed = (int(nodes) * int(per_node), int(per_node)) if per_node else (int(nodes), None)
        except ValueError:
            raise UsageError(f"--ranks takes comma-separated rank counts K or placements NxR (N "
                             f"nodes of R ranks), got {text!r}") from None
        if min(int(nodes), placed[1] or 1) < 1:
            raise UsageError(f"--ranks must be positive, got {text!r}")
        series.add(placed)
    if not series:
        raise UsageError(f"--ranks must be positive, got {text!r}")
    return sorted(series, key=lambda s: (s[0], -(s[1] or s[0])))


def require_positive(cfg, *names):
    """UsageError naming the option when any of these fields is zero or negative."""
    for name in names:
        value = getattr(cfg, name)
        if value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def require_non_negative(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {value}")


ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu", "softplus", "gelu", "gelu_tanh",
               "silu")  # PyTorch's definitions
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop", "lamb", "lars")  # optim.py's rules
# the options each rule reads besides --lr and --weight-decay: another rule's, given, is an error
OPTIMIZER_OPTIONS = {
    "sgd": (), "momentum": ("momentum", "nesterov"), "adam": ("beta1", "beta2", "eps"),
    "adamw": ("beta1", "beta2", "eps"), "rmsprop": ("alpha", "eps"),
    "lamb": ("beta1", "beta2", "eps", "trust_clip"),
    "lars": ("momentum", "trust_coefficient", "trust_clip"),
}
OUTPUT_ACTIVATIONS = ("identity", "sigmoid")
DTYPES = ("float32", "float64")  # model.DTYPES


class Resume(enum.Enum):
    """--resume: start a new run (NO), continue the one in RUN_DIR (YES), or continue it when it
    holds a checkpoint (AUTO, decided once at start-up)."""
    NO = "no"
    YES = "yes"
    AUTO = "auto"

    @classmethod
    def parse(cls, value):
        """'no'/'yes'/'auto', or a TOML/API boolean."""
        if isinstance(value, bool):
            return cls.YES if value else cls.NO
        return value if isinstance(value, cls) else cls(value)

    def shown(self):
        """As a checkpoint records it (False, True, 'auto')."""
        return {Resume.NO: False, Resume.YES: True}.get(self, self.value)


METRICS_HELP = ("task metrics of each validation, named as scikit-learn names them, comma-"
                "separated: " + ", ".join(CLASSIFICATION) + " (cross_entropy); "
                + ", ".join(REGRESSION) + " (mse); exact over ranks (metrics.py)")


def names_from_list(value):
    """metrics = ["f1", "roc_auc"] in TOML or the API means 'f1,roc_auc'."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    return value


def shown_hidden(sizes):
    return ",".join(str(s) for s in sizes)


def parse_weights(text):
    """'3' or '1,2.5' (or [1, 2.5], or a number) -> (3.0,) / (1.0, 2.5); '' -> ()."""
    if isinstance(text, (int, float)):
        text = [text]
    parts = list(text) if isinstance(text, (list, tuple)) else [
        p for p in str(text).replace(" ", "").split(",") if p]
    try:
        weights = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UsageError(f"--pos-weight must be comma-separated positive numbers, got "
                         f"{text!r}") from None
    if any(not w > 0 for w in weights):
        raise UsageError(f"--pos-weight values must be positive, got {text!r}")
    return weights


def shown_weights(weights):
    return ",".join(f"{w:g}" for w in weights)


def hidden_from_list(value):
    """hidden = [128, 64] in TOML or the API means '128,64'."""
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return ",".join(str(v) for v in value)
    return value


def shuffle_from_bool(value):
    """shuffle = true/false in older configs: rank/none."""
    return ("rank" if value else "none") if isinstance(value, bool) else value


# Train options by section. Policy: kept_on_resume (a resumed run takes the checkpoint's value:
# what it trains on and how it learns), changeable_on_resume (what a continued sweep may change:
# how it is watched and run), set_by_sweep (a sweep decides it for each trial).


@dataclass(frozen=True)
class DataOptions:
    """What the run reads."""
    data: str = option("", "training data: HDF5 (or .npz) with X (rows x features) and y, or "
                           "Parquet (y a column, X the others); several files as a glob or a "
                           "comma list (default: the bundled digits training set)",
                       kept_on_resume=True)
    val_data: str = option("", "validation data evaluated after every epoch "
                               "(default: the bundled digits test set when --data is not given)",
                           kept_on_resume=True)
    x_key: str = option("X", "name of the input dataset in the data files (Parquet: X is every "
                             "column but the target and weight columns)", kept_on_resume=True)
    y_key: str = option("y", "name of the target dataset (Parquet: column) in the data files",
                        kept_on_resume=True)
    memory_budget: float = option(0.0, "MiB of training inputs a rank may hold: a larger slice is "
                                       "streamed from the file in chunks read ahead in the "
                                       "background (0: half the node's available memory shared "
                                       "by its ranks)", bound=NON_NEGATIVE)
    shuffle: str = option("rank", "rank: each rank shuffles its own rows every epoch (cheap); "
                                  "global: a seeded permutation of all rows every epoch, rows "
                                  "exchanged between ranks (all-to-all), results independent of "
                                  "the number of ranks; none (or --no-shuffle): file order",
                          ("rank", "global", "none"), coerce=shuffle_from_bool,
                          negative=("none", "keep file order (same as --shuffle none)"),
                          kept_on_resume=True)
    weight_key: str = option("", "a dataset of the training file with each row's own weight "
                                 "(one non-negative number per row): each row's loss is weighted "
                                 "by it, the mean taken over the weights; validation rows too "
                                 "where their file has it", kept_on_resume=True)
    val_fraction: float = option(0.0, "validate on this fraction of the training file's rows "
                                      "instead of --val-data: drawn with --seed, the same rows "
                                      "at any rank count, kept by resume and used by evaluate; "
                                      "scaling is fitted on the training rows only (0: off)",
                                 bound=FRACTION, kept_on_resume=True)
    scale_inputs: str = option("none", "scale each input feature by statistics of the whole "
                                       "training set, computed across ranks and kept in the "
                                       "checkpoint (evaluate, predict, the API and ONNX export "
                                       "apply them): standard = (x - mean) / std, minmax = (x - "
                                       "min) / (max - min); none: as stored, as scikit-learn and "
                                       "PyTorch take them", INPUT_SCALINGS, kept_on_resume=True)
    scale_targets: str = option("none", "--loss mse: standard = train on (y - mean) / std of each "
                                        "target; predictions come back in the targets' units",
                                TARGET_SCALINGS, kept_on_resume=True)


@dataclass(frozen=True)
class ModelOptions:
    """The network and its loss."""
    hidden: tuple = option("128,64", "hidden layer widths, comma-separated ('' for none)",
                           parse=parse_hidden, show=shown_hidden, flag_type=str,
                           coerce=hidden_from_list, kept_on_resume=True)
    activation: str = option("relu", "hidden-layer activation (PyTorch's definitions; softplus "
                                     "with beta 1, linear above 20; gelu exact, gelu_tanh its "
                                     "tanh approximation)", ACTIVATIONS,
                             kept_on_resume=True)
    leaky_slope: float = option(0.01, "--activation leaky_relu: the slope for negative inputs",
                                bound=POSITIVE, kept_on_resume=True)
    output_activation: str = option("identity", "output activation with --loss mse",
                                    OUTPUT_ACTIVATIONS, kept_on_resume=True)
    dtype: str = option("float32", "the number type of the weights, the data, the gradient sum, "
                                   "the checkpoints and exports (float64: about half the speed "
                                   "and twice the memory)", DTYPES, kept_on_resume=True)
    loss: str = option("cross_entropy", "cross_entropy: integer labels, softmax output; mse: "
                                        "float targets (rows x K); bce: 0/1 targets (rows, or "
                                        "rows x K labels), a sigmoid per output",
                       ("cross_entropy", "mse", "bce"), kept_on_resume=True)
    pos_weight: tuple = option("", "--loss bce: weight of the positive targets, one value or one "
                                   "per output, comma-separated (torch's BCEWithLogitsLoss "
                                   "pos_weight; e.g. negatives / positives)", parse=parse_weights,
                               show=shown_weights, flag_type=str, kept_on_resume=True)
    weight_init: str = option("he", "initial weights: he = He-normal before ReLU, Glorot-uniform "
                                    "otherwise; glorot = Glorot-uniform everywhere (scikit-learn's "
                                    "and Keras's); biases start at 0", ("he", "glorot"),
                              kept_on_resume=True)
    class_weight: str = option("", "--loss cross_entropy: weight each row's loss by its class's "
                                   "weight, the mean taken over the weights (torch's "
                                   "CrossEntropyLoss(weight=...)): 'balanced' = rows / (classes "
                                   "x the class's rows) over the training set, or one weight per "
                                   "class, comma-separated", kept_on_resume=True)
    classes: int = option(0, "classes for cross_entropy (0: the class names stored with the "
                             "labels, else the largest label + 1)", bound=NON_NEGATIVE,
                          kept_on_resume=True)
    dropout: float = option(
        0.0,
        "inverted dropout on hidden layers while training, this "
        "probability (masks keyed by seed, update, file row and unit: the "
        "same on any number of ranks)",
        bound=FRACTION,
        kept_on_resume=True,
    )


@dataclass(frozen=True)
class OptimOptions:
    """The update rule."""
    optimizer: str = option("adam", "update rule (PyTorch's where PyTorch has it): sgd; momentum "
                                    "(--momentum, --nesterov); adam; adamw (decoupled weight "
                                    "decay); rmsprop (--alpha); lamb and lars, for large batches: "
                                    "each weight matrix's step scaled by a trust ratio of norms "
                                    "(--trust-coefficient, --trust-clip)", OPTIMIZERS,
                            kept_on_resume=True)
    lr: float = option(1e-3, "learning rate", bound=POSITIVE, kept_on_resume=True)
    momentum: float = option(0.9, "momentum factor (--optimizer momentum, lars)",
                             bound=NON_NEGATIVE, kept_on_resume=True)
    nesterov: bool = option(False, "Nesterov momentum (--optimizer momentum)", kept_on_resume=True)
    beta1: float = option(0.9, "first-moment decay (adam, adamw, lamb)", bound=FRACTION,
                          kept_on_resume=True)
    beta2: float = option(0.999, "second-moment decay (adam, adamw, lamb)", bound=FRACTION,
                          kept_on_resume=True)
    eps: float = option(1e-8, "term added to the denominator (adam, adamw, rmsprop, lamb)",
                        bound=POSITIVE, kept_on_resume=True)
    alpha: float = option(0.99, "smoothing of the squared gradients' average (--optimizer "
                                "rmsprop)", bound=FRACTION, kept_on_resume=True)
    trust_coefficient: float = option(0.001, "LARS's trust coefficient eta: a weight matrix's "
                                             "rate is lr x eta ||w|| / (||g|| + weight decay x "
                                             "||w||) (--optimizer lars)", bound=POSITIVE,
                                      kept_on_resume=True)
    trust_clip: float = option(10.0, "cap on each weight matrix's trust ratio (--optimizer lamb, "
                                     "lars; DeepSpeed's max_coeff; 0: none)", bound=NON_NEGATIVE,
                               kept_on_resume=True)
    weight_decay: float = option(0.0, "weight decay: an L2 penalty added to the gradient (sgd, "
                                      "momentum, adam, rmsprop), decoupled from it (adamw, as "
                                      "PyTorch's AdamW, whose own default is 0.01), or part of "
                                      "the trust-scaled step of weight matrices, not biases "
                                      "(lamb, lars)", bound=NON_NEGATIVE, kept_on_resume=True)
    clip_grad_norm: float = option(0.0, "scale the averaged gradient down to this L2 norm when it "
                                        "is larger, before weight decay (0: off)",
                                   bound=NON_NEGATIVE, kept_on_resume=True)
    lr_scale: str = option("none", "scale --lr with the global batch B: linear (lr*B/B0) or sqrt "
                                   "(lr*sqrt(B/B0)), B0 = --lr-ref-batch",
                           SCALING_RULES, kept_on_resume=True)
    lr_ref_batch: int = option(256, "the batch B0 that --lr was tuned for (--lr-scale)",
                               bound=POSITIVE, kept_on_resume=True)


@dataclass(frozen=True)
class ScheduleOptions:
    """How long the run trains, in what batches, and the learning rate over it."""
    batch_size: int = option(64, "GLOBAL batch size, split across ranks", bound=POSITIVE,
                             kept_on_resume=True)
    epochs: int = option(30, "epochs to train (in total, counting resumed ones)", bound=POSITIVE)
    steps: int = option(0, "stop after this many optimizer steps in total (0: no cap)",
                        bound=NON_NEGATIVE)
    lr_schedule: str = option("constant", "learning rate over the run's updates: constant, step "
                                          "(times --gamma every --step-size updates), cosine "
                                          "(down to --min-lr) or plateau (times "
                                          "--plateau-factor when --monitor stalls)", SCHEDULES,
                              kept_on_resume=True)
    warmup_steps: int = option(0, "updates of linear warm-up from lr/W to lr before the schedule",
                               bound=NON_NEGATIVE, kept_on_resume=True)
    min_lr: float = option(0.0, "the cosine schedule's last learning rate, the plateau "
                                "schedule's lowest", bound=NON_NEGATIVE, kept_on_resume=True)
    step_size: int = option(1000, "updates between learning-rate drops (--lr-schedule step)",
                            bound=POSITIVE, kept_on_resume=True)
    gamma: float = option(0.1, "factor of each drop (--lr-schedule step)", bound=POSITIVE,
                          kept_on_resume=True)
    plateau_factor: float = option(0.1, "--lr-schedule plateau: multiply the rate by this when "
                                        "--monitor has not improved for more than "
                                        "--plateau-patience epochs", bound=FRACTION,
                                   kept_on_resume=True)
    plateau_patience: int = option(10, "--lr-schedule plateau: epochs without improvement "
                                       "tolerated before a cut", bound=NON_NEGATIVE,
                                   kept_on_resume=True)
    plateau_cooldown: int = option(0, "--lr-schedule plateau: epochs after a cut before "
                                      "stalling counts again", bound=NON_NEGATIVE,
                                   kept_on_resume=True)
    plateau_threshold: float = option(1e-4, "--lr-schedule plateau: an improvement must beat the "
                                            "best by this fraction of it", bound=NON_NEGATIVE,
                                      kept_on_resume=True)
    monitor: str = option("val_loss", "the validation figure early stopping, best.h5 and the "
                                      "plateau schedule watch: val_loss, val_accuracy or val_ and "
                                      "a metric of --metrics (its macro or mean; lower is better "
                                      "for val_loss, val_log_loss, val_mae, val_rmse, higher for "
                                      "the others)", tuple(MONITORED), kept_on_resume=True)
    early_stop: int = option(0, "stop when --monitor has not improved for this many epochs; "
                                "RUN_DIR/best.h5 keeps the best weights (0: off)",
                             bound=NON_NEGATIVE)
    early_stop_delta: float = option(0.0, "an improvement must better --monitor by more than "
                                          "this", bound=NON_NEGATIVE)


@dataclass(frozen=True)
class ParallelOptions:
    """How the work is split over ranks and threads."""
    accumulate: int = option(1, "data parallel: run each rank's share of a global batch as this "
                                "many pieces, summing their gradients before the one Allreduce "
                                "(the same update, less activation memory)", bound=POSITIVE)
    overlap_mb: float = option(0.0, "data parallel: Allreduce gradients in buckets of this many "
                                    "MiB, last layer first, while earlier layers' backward runs "
                                    "(0: one Allreduce after the backward pass)",
                               bound=NON_NEGATIVE)
    shard_optimizer: bool = option(False, "each data-parallel rank updates 1/p of the parameters "
                                          "and keeps that slice's optimizer state "
                                          "(Reduce_scatter, update, Allgather; ZeRO stage 1)")
    allreduce: str = option("auto", ALLREDUCE_HELP, ("auto", "mpi"))
    pipeline_stages: int = option(1, "split the layers into S pipeline stages (ranks = S x "
                                     "replicas); 1 = pure data parallel", bound=POSITIVE)
    partition: str = option("", "layers per pipeline stage, e.g. '2,1' (default: balanced by "
                                "FLOPs)")
    micro_batches: int = option(4, "micro-batches per global batch in pipeline mode",
                                bound=POSITIVE)
    schedule: str = option("1f1b", "pipeline schedule: gpipe (all forwards, then all backwards) "
                                   "or 1f1b (keeps at most S micro-batches of activations)",
                           ("gpipe", "1f1b"))
    threads: int = option(1, "BLAS threads per rank", bound=POSITIVE, changeable_on_resume=True)


@dataclass(frozen=True)
class RunOptions:
    """Where the run lives and what it starts from."""
    run_dir: str = option("runs/latest", "folder for checkpoint.h5 and metrics.jsonl; one run at "
                                         "a time (it is locked while training)", set_by_sweep=True)
    resume: Resume = option("no", "continue the run in RUN_DIR where it stopped, on its own data "
                                  "and options (epochs, steps, ranks, threads and run-time knobs "
                                  "may change); --resume auto: continue when RUN_DIR holds a "
                                  "checkpoint, else start (a requeued job's choice)",
                            ("no", "yes", "auto"), parse=Resume.parse, show=Resume.shown,
                            flag_type=str, accepts=(bool,), bare="yes",
                            negative=("no", "start a new run (the default)"), set_by_sweep=True)
    overwrite: bool = option(False, "start a new run in a RUN_DIR that holds one: its checkpoints "
                                    "and metrics are set aside once every input has been checked "
                                    "and removed at the new run's first checkpoint (put back if "
                                    "it fails before)", set_by_sweep=True)
    init: str = option("", "start from this checkpoint's weights (and architecture) with a fresh "
                           "optimizer")
    seed: int = option(0, "seed for initialisation and shuffling", kept_on_resume=True)
    keep_checkpoints: int = option(0, "also keep the last K checkpoints as "
                                      "RUN_DIR/checkpoints/step-NNNNNNN.h5 (0: only checkpoint.h5)",
                                   bound=NON_NEGATIVE)
    timeline: str = option("", "write a Chrome-trace JSON of every rank's phases to this file "
                               "(open in ui.perfetto.dev or chrome://tracing)")
    log_every: int = option(10, "print and record metrics every N steps", bound=POSITIVE,
                            changeable_on_resume=True)
    tensorboard: str = option("", "also write the metrics as TensorBoard scalars into this "
                                  "folder (rank 0; needs tensorboardX: the tensorboard extra)")
    metrics: tuple = option("", METRICS_HELP, parse=parse_metric_names, show=",".join,
                            flag_type=str, coerce=names_from_list)
    progress: str = option("auto", "a live progress bar with ETA on rank 0 in place of the step "
                                   "lines (bar), plain lines only (lines), or the bar when a "
                                   "person watches on a terminal (auto: rank 0's stdout, or "
                                   "under mpiexec the launcher's, is one; srun: with --pty)",
                           ("auto", "bar", "lines"), changeable_on_resume=True)
    debug: bool = option(False, "show Python tracebacks on errors", changeable_on_resume=True)


@dataclass(frozen=True)
class SafetyOptions:
    """What protects the run: signals, non-finite steps, stalls, diverged replicas."""
    checkpoint_on_signal: bool = option(True, "on SIGTERM/SIGINT (a scheduler's time limit, "
                                              "Ctrl-C) finish the step, write a final checkpoint "
                                              "and exit", changeable_on_resume=True)
    signal_grace: int = option(30, "seconds after a signal before exiting without that "
                                   "checkpoint", bound=NON_NEGATIVE, changeable_on_resume=True)
    on_nonfinite: str = option("stop", "a NaN/inf loss or gradient: stop (keep the last good "
                                       "checkpoint) or skip that update", ("stop", "skip"))
    stall_warning: float = option(60.0, "report which ranks have not arrived when a step has "
                                        "taken this many seconds and 10x the recent median "
                                        "(0: off)", bound=NON_NEGATIVE, changeable_on_resume=True)
    stall_timeout: float = option(600.0, "abort the whole job when one step has taken this many "
                                         "seconds and 100x the recent median, or an evaluation or "
                                         "checkpoint write this many seconds (0: wait forever)",
                                  bound=NON_NEGATIVE, changeable_on_resume=True)
    check_every: int = option(100, "verify every N steps that all ranks hold identical parameters",
                              bound=POSITIVE, changeable_on_resume=True)


@dataclass(frozen=True)
class TrainOptions(Sections):
    """`mpinn train`'s options, each section read by the part of the run it configures."""
    data: DataOptions
    model: ModelOptions
    optim: OptimOptions
    schedule: ScheduleOptions
    parallel: ParallelOptions
    run: RunOptions
    safety: SafetyOptions


def _validate_train(cfg):
    """Checks across options (each field's own bound is checked before)."""
    resume = Resume.parse(cfg.resume)
    if resume is not Resume.NO and cfg.init:
        raise UsageError("--resume and --init exclude each other")
    if resume is not Resume.NO and cfg.overwrite:
        raise UsageError("--resume continues the run in RUN_DIR and --overwrite replaces it: "
                         "give one of them")
    if cfg.shard_optimizer and cfg.overlap_mb:
        raise UsageError("--shard-optimizer and --overlap-mb exclude each other (the sharded "
                         "update reduces the gradient in one Reduce_scatter)")
    if cfg.val_fraction and cfg.val_data:
        raise UsageError("--val-fraction splits the training file and --val-data names another "
                         "validation file: give one of them")
    parse_hidden(cfg.hidden)
    check_optimizer_options(cfg)
    if cfg.leaky_slope != ModelOptions().leaky_slope and cfg.activation != "leaky_relu":
        raise UsageError(f"--leaky-slope applies to --activation leaky_relu; this run uses "
                         f"{cfg.activation}")
    if parse_weights(cfg.pos_weight) and cfg.loss != "bce":
        raise UsageError("--pos-weight weights the positive targets of --loss bce")
    if cfg.class_weight and cfg.loss != "cross_entropy":
        raise UsageError("--class-weight weights the classes of --loss cross_entropy")
    parse_metric_names(cfg.metrics)


def check_optimizer_options(cfg):
    """An option of another update rule, set away from its default, is a mistake to report: the
    run would silently ignore it."""
    reads = OPTIMIZER_OPTIONS[cfg.optimizer]
    defaults = OptimOptions()
    for name in sorted(set().union(*OPTIMIZER_OPTIONS.values()) - set(reads)):
        if getattr(cfg, name) != getattr(defaults, name):
            users = [o for o, names in OPTIMIZER_OPTIONS.items() if name in names]
            raise UsageError(f"--{name.replace('_', '-')} applies to --optimizer "
                             f"{' or '.join(users)}; this run uses {cfg.optimizer}, which does "
                             f"not read it")


TrainConfig = flat_config(
    "TrainConfig", TrainOptions, _validate_train,
    "`mpinn train`'s options as the command line, a TOML file or mpinn.fit give them: one field "
    "per option of TrainOptions' sections, checked; .sections() parses them into their types.",
    methods={"hidden_sizes": lambda self: parse_hidden(self.hidden)})

SET_BY_SWEEP = names_where(TrainConfig, "set_by_sweep")
KEPT_ON_RESUME = names_where(TrainConfig, "kept_on_resume")


def _validate_sweep(self):
    require_positive(self, "ranks_per_trial")
    require_non_negative(self, "random")
    if self.resume and self.overwrite:
        raise UsageError("--resume continues the sweep in OUT and --overwrite replaces it: give "
                         "one of them")
    if not self.resume and not self.grid:
        raise UsageError("--grid GRID.toml is required (a [grid] table of option lists and/or "
                         "[[trial]] tables); with --resume the sweep in OUT is continued")
    build(TrainConfig, self.train_values())  # the base of every trial must be a valid run


def _train_values(self):
    """This sweep's values of the train options: the base of every trial."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name not in SET_BY_SWEEP}


SWEEP_FIELDS = [
    ("grid", str, option("", "TOML file: a [grid] table mapping train options to lists of values "
                             "(every combination is a trial) and/or [[trial]] tables (one trial "
                             "each)")),
    ("ranks_per_trial", int, option(1, "ranks that train one trial together (G); the world is "
                                       "split into N/G groups that take trials one by one",
                                    changeable_on_resume=True)),
    ("out", str, option("sweep", "folder of the sweep: OUT/trial-NNN run folders, "
                                 "results.csv, results.md, results.png",
                        changeable_on_resume=True)),
    ("random", int, option(0, "train K combinations of the grid drawn with --seed instead of all "
                              "of them (0: all); [[trial]] tables are always trained")),
    ("resume", bool, option(False, "continue the sweep in OUT: finished trials are skipped, "
                                   "stopped ones continue from their checkpoints",
                            changeable_on_resume=True)),
    ("overwrite", bool, option(False, "start a new sweep in an OUT that holds one: its trial "
                                      "folders and results are removed first")),
]
SweepConfig = dataclasses.make_dataclass(
    "SweepConfig",
    SWEEP_FIELDS + [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
                    for f in dataclasses.fields(TrainConfig) if f.name not in SET_BY_SWEEP],
    namespace={"validate": _validate_sweep, "train_values": _train_values,
               "__doc__": "`mpinn sweep`: its own options, then every train option as the base "
                          "of each trial."})
# what may change when a sweep is continued: where it runs and how it is watched, not what it trains
SWEEP_CHANGEABLE_ON_RESUME = names_where(SweepConfig, "changeable_on_resume")


@dataclass
class EvaluateConfig:
    checkpoint: str = option("runs/latest/checkpoint.h5", "checkpoint to evaluate")
    data: str = option("", "HDF5 data with X and y (default: the bundled digits test set)")
    x_key: str = option("X", "name of the input dataset")
    y_key: str = option("y", "name of the target dataset")
    batch_size: int = option(1024, "rows per forward pass on each rank")
    pipeline_stages: int = option(1, "run the network as S pipeline stages (forward only)")
    partition: str = option("", "layers per pipeline stage (default: balanced by FLOPs)")
    json: bool = option(False, "print one JSON object instead of text")
    metrics: str = option("", METRICS_HELP.replace("each validation", "the evaluation"))
    threads: int = option(1, "BLAS threads per rank")
    debug: bool = option(False, "show Python tracebacks on errors")

    def validate(self):
        require_positive(self, "batch_size", "threads", "pipeline_stages")
        parse_metric_names(self.metrics)


@dataclass
class PredictConfig:
    checkpoint: str = option("runs/latest/checkpoint.h5", "checkpoint to predict with")
    data: str = option("", "HDF5 data with X (default: the bundled digits test set)")
    x_key: str = option("X", "name of the input dataset")
    out: str = option("predictions.h5", "output file: .h5/.hdf5 (datasets pred, prob or output) "
                                        "or .csv")
    batch_size: int = option(4096, "rows per forward pass")
    overwrite: bool = option(False, "replace OUT if it exists")
    pipeline_stages: int = option(1, "run the network as S pipeline stages (forward only)")
    partition: str = option("", "layers per pipeline stage (default: balanced by FLOPs)")
    threads: int = option(1, "BLAS threads")
    debug: bool = option(False, "show Python tracebacks on errors")

    def validate(self):
        require_positive(self, "batch_size", "threads", "pipeline_stages")
        if not self.out.lower().endswith((".h5", ".hdf5", ".csv")):
            raise UsageError(f"--out must end in .h5, .hdf5 or .csv, got {self.out!r}")


@dataclass
class BenchConfig:
    features: int = option(784, "input features of the synthetic data")
    classes: int = option(10, "classes of the synthetic data")
    hidden: str = option("512,512", "hidden layer widths, comma-separated")
    activation: str = option("relu", "hidden-layer activation", ACTIVATIONS)
    dtype: str = option("float32", "the number type of the network and its data", DTYPES)
    batch_size: int = option(0, "GLOBAL batch split across ranks (strong scaling); 0: use "
                                "--batch-per-rank")
    batch_per_rank: int = option(128, "rows per rank per step when --batch-size is 0 (weak "
                                      "scaling)")
    optimizer: str = option("momentum", "update rule", OPTIMIZERS)
    warmup: int = option(5, "untimed steps first")
    steps: int = option(50, "timed steps")
    threads: int = option(1, "BLAS threads per rank")
    overlap_mb: float = option(0.0, "Allreduce gradients in buckets of this many MiB during the "
                                    "backward pass (0: one Allreduce after it)")
    shard_optimizer: bool = option(False, "each rank updates 1/p of the parameters "
                                          "(Reduce_scatter, update, Allgather)")
    allreduce: str = option("auto", ALLREDUCE_HELP, ("auto", "mpi"))
    allreduce_sweep: bool = option(False, "also time Allreduce over message sizes from 4 B to "
                                          "--sweep-max bytes (for the performance model)")
    sweep_max: int = option(1 << 24, "largest Allreduce message of the sweep, bytes")
    seed: int = option(0, "seed of the synthetic data and the weights")
    json: bool = option(False, "print one JSON object instead of text")
    debug: bool = option(False, "show Python tracebacks on errors")

    def validate(self):
        require_positive(self, "features", "classes", "batch_per_rank", "steps", "threads",
                         "sweep_max")
        require_non_negative(self, "batch_size", "warmup")
        if self.classes < 2:
            raise UsageError(f"--classes must be at least 2, got {self.classes}")
        self.hidden_sizes()

    def hidden_sizes(self):
        return parse_hidden(self.hidden)


NETWORK_HELP = ("interconnect for the projection: measured (the alpha-beta fit of this run), "
                "infiniband-ndr, infiniband-hdr, infiniband-edr, slingshot-11, omni-path, "
                "ethernet-100g, ethernet-25g, ethernet-10g")


@dataclass
class ReportConfig:
    results: str = option("scaling/raw", "folder of `mpinn bench --json` results (or files, "
                                         "comma-separated)")
    out: str = option("scaling", "report folder: report.md, results.csv, *.png")
    mode: str = option("auto", "strong or weak scaling (auto: from the runs)",
                       ("auto", "strong", "weak"))
    network: str = option("measured", NETWORK_HELP)
    alpha: float = option(0.0, "latency in seconds for the projection (with --beta; overrides "
                               "--network)")
    beta: float = option(0.0, "bandwidth in bytes/s for the projection (with --alpha)")
    ranks_per_node: int = option(1, "ranks per node in the projections (more than 1 adds this "
                                    "node's measured shared-memory Allreduce inside each node)")
    title: str = option("mpinn scaling report", "report title")
    overwrite: bool = option(False, "replace the report in OUT if there is one")
    debug: bool = option(False, "show Python tracebacks on errors")

    def validate(self):
        if self.alpha < 0 or self.beta < 0:
            raise UsageError("--alpha and --beta must be positive")
        require_positive(self, "ranks_per_node")


@dataclass
class ScaleConfig:
    mode: str = option("strong", "strong: fixed global batch; weak: fixed batch per rank",
                       ("strong", "weak"))
    ranks: str = option("1,2,4", "the series, comma-separated: rank counts K, or NxR for N nodes "
                                 "of R ranks (the --launcher then needs {ppn})")
    cores: int = option(0, "instead of --ranks and --threads: every ranks x threads split of this "
                           "many cores (strong scaling), and which trains fastest")
    out: str = option("scaling", "report folder (raw results in OUT/raw)")
    features: int = option(784, "input features of the synthetic data")
    classes: int = option(10, "classes of the synthetic data")
    hidden: str = option("512,512", "hidden layer widths")
    batch_size: int = option(1024, "global batch (strong scaling)")
    batch_per_rank: int = option(128, "rows per rank (weak scaling)")
    steps: int = option(30, "timed steps per run")
    warmup: int = option(5, "untimed steps per run")
    threads: int = option(1, "BLAS threads per rank")
    sweep_max: int = option(1 << 24, "largest Allreduce message of the sweep, bytes")
    network: str = option("measured", NETWORK_HELP)
    launcher: str = option("", "command that starts {n} ranks, {ppn} per node (default: the "
                               "venv's 'mpiexec -n {n}')")
    timeout: int = option(1800, "seconds one run may take")
    title: str = option("mpinn scaling report", "report title")
    overwrite: bool = option(False, "replace the results and report in OUT if there are some")
    debug: bool = option(False, "show Python tracebacks on errors")

    def validate(self):
        require_positive(self, "features", "classes", "batch_size", "batch_per_rank", "steps",
                         "threads", "timeout", "sweep_max")
        require_non_negative(self, "cores")
        parse_hidden(self.hidden)
        if self.cores:
            if self.batch_size < self.cores:
                raise UsageError(f"--batch-size {self.batch_size} is smaller than --cores "
                                 f"{self.cores}")
            return
        series = parse_ranks(self.ranks)
        if len(series) < 2 or series[0][0] != 1:
            raise UsageError(
                f"--ranks {self.ranks}: a scaling series needs 1 (the baseline) and at "
                "least one more rank count, e.g. 1,2,4"
            )
        if self.mode == "strong" and self.batch_size < series[-1][0]:
            raise UsageError(
                f"--batch-size {self.batch_size} is smaller than {series[-1][0]} ranks"
            )
        if any(per_node for _, per_node in series) and "{ppn}" not in self.launcher:
            raise UsageError(f"--ranks {self.ranks} places ranks on nodes (NxR): the --launcher "
                             "needs {ppn} (ranks per node) besides {n}, e.g. 'mpiexec -n {n} "
                             "-ppn {ppn} -hosts a,b'")

    def series(self):
        """[(ranks, threads, ranks per node or None)] of the runs."""
        if self.cores:
            return [(k, self.cores // k, None) for k in range(1, self.cores + 1)
                    if self.cores % k == 0]
        return [(k, self.threads, per_node) for k, per_node in parse_ranks(self.ranks)]


@dataclass
class JobsConfig:
    scheduler: str = option(
        "slurm", "which scheduler's job file", ("slurm", "pbs"), positional=True
    )
    kind: str = option("train", "train (mpinn train), scaling (bench series + report) or sweep "
                                "(mpinn sweep over a grid file)", ("train", "scaling", "sweep"))
    nodes: int = option(1, "nodes")
    ranks_per_node: int = option(2, "MPI ranks per node")
    threads: int = option(1, "BLAS threads per rank")
    time: str = option("00:30:00", "wall-time limit, HH:MM:SS (SLURM also D-HH:MM:SS)")
    partition: str = option("", "SLURM partition or PBS queue (default: the site's)")
    account: str = option("", "account/project to charge (default: the site's)")
    job_name: str = option("", "job name (default: the template's)")
    data: str = option("", "train, sweep: the training data the job uses (default: the bundled "
                           "digits; the job's DATA variable overrides it at submission)")
    val_data: str = option("", "train, sweep: the validation data (VAL_DATA)")
    args: str = option("", "the further options of the command the job runs, quoted as one "
                           "argument, e.g. '--epochs 50 --hidden 256,256' (ARGS; BENCH_ARGS for "
                           "scaling)")
    venv: str = option("", "the venv with mpinn the job activates (default: .venv in the folder "
                           "it is submitted from; a missing one fails the job at once)")
    out: str = option("", "write the job file here (default: print it)")
    launch_command: bool = option(False, "print, instead of a job file, the launcher for this "
                                         "node's MPI library (what the job files run): srun "
                                         "with the PMI the library speaks and core binding, else "
                                         "its mpiexec; the rank count follows it")
    overwrite: bool = option(False, "replace OUT if it exists")
    debug: bool = option(False, "show Python tracebacks on errors")

    def validate(self):
        require_positive(self, "nodes", "ranks_per_node", "threads")


@dataclass
class DoctorConfig:
    run_dir: str = option(".", "the folder runs will write to: checked for writing, HDF5 files "
                               "and free disk")
    threads: int = option(1, "BLAS threads per rank the runs will use")
    sweep_max: int = option(1 << 22, "largest Allreduce message of the latency/bandwidth sweep, "
                                     "bytes")
    json: bool = option(False, "print one JSON object instead of text")
    debug: bool = option(False, "show Python tracebacks on errors")

    def validate(self):
        require_positive(self, "threads", "sweep_max")


@dataclass
class SynthConfig:
    out: str = option("synthetic.h5", "output HDF5 file (X float32, y int64)")
    rows: int = option(100_000, "rows to write (e.g. 10000000 for a weak-scaling study)")
    features: int = option(64, "input features")
    classes: int = option(10, "classes")
    hidden: str = option("64", "hidden widths of the random teacher network")
    seed: int = option(0, "seed: the same seed gives the same rows, whatever the chunking")
    chunk_rows: int = option(65_536, "rows per HDF5 chunk and per write (chunks hold 4 MiB at "
                                     "most)")
    compression: str = option("none", "HDF5 compression of the datasets", ("none", "gzip", "lzf"))
    overwrite: bool = option(False, "replace OUT if it exists")
    debug: bool = option(False, "show Python tracebacks on errors")

    def validate(self):
        require_positive(self, "rows", "features", "chunk_rows")
        if self.classes < 2:
            raise UsageError(f"--classes must be at least 2, got {self.classes}")
        parse_hidden(self.hidden)


@dataclass
class StatsConfig:
    path: str = option("", "HDF5 file whose columns to summarise", positional=True)
    x_key: str = option("X", "name of the input dataset")
    y_key: str = option("y", "name of the target dataset (summarised when it holds floats: "
                             "regression targets)")
    chunk_rows: int = option(65_536, "rows read at a time")
    json: bool = option(False, "print one JSON object instead of a table")
    debug: bool = option(False, "show Python tracebacks on errors")

    def validate(self):
        require_positive(self, "chunk_rows")


@dataclass
class InspectConfig:
    path: str = option("", "HDF5 file to describe", positional=True)
    chunk_rows: int = option(65_536, "rows read at a time")
    json: bool = option(False, "print one JSON object instead of text")
    debug: bool = option(False, "show Python tracebacks on errors")

    def validate(self):
        require_positive(self, "chunk_rows")


@dataclass
class ConvertConfig:
    source: str = option("", "input file: .npz, .csv (or .csv.gz), or MNIST IDX images",
                         positional=True)
    out: str = option("data.h5", "output HDF5 file (with --split: OUT-train.h5 and OUT-test.h5)")
    format: str = option("auto", "input format (auto: by the file name)",
                         ("auto", "npz", "csv", "idx"))
    x_key: str = option("X", "npz: the array of inputs")
    y_key: str = option("y", "npz: the array of labels or targets")
    label_column: str = option("-1", "csv: the label column, by header name or index (-1: last); "
                                     "text class names become integers, the names kept in the "
                                     "file")
    delimiter: str = option(",", "csv: the field separator", (",", ";", "tab"))
    labels: str = option("", "idx: the labels file that goes with the images")
    scale: float = option(1.0, "multiply inputs by this (e.g. 0.00392156862745098 = 1/255 for "
                               "MNIST pixels)")
    targets: str = option("auto", "what the labels are: classes (integer class labels), values "
                                  "(float regression targets) or auto (text and whole numbers are "
                                  "classes, other numbers values)", ("auto", "classes", "values"))
    split: float = option(0.0, "write a train/test pair with this fraction for training "
                               "(stratified by class; values: rows at random) (0: one file)")
    seed: int = option(0, "seed of the split")
    chunk_rows: int = option(65_536, "rows read and written at a time (and HDF5 chunk rows, "
                                     "4 MiB of features at most)")
    compression: str = option("none", "HDF5 compression", ("none", "gzip", "lzf"))
    overwrite: bool = option(False, "replace the output file(s) if they exist")
    debug: bool = option(False, "show Python tracebacks on errors")

    def validate(self):
        require_positive(self, "chunk_rows")
        if not 0 <= self.split < 1:
            raise UsageError(f"--split must be in [0, 1), got {self.split}")


@dataclass
class ExportConfig:
    checkpoint: str = option("runs/latest/checkpoint.h5", "checkpoint to export")
    format: str = option("onnx", "onnx (ONNX model), torch (state dict for torch.nn.Sequential) "
                                 "or npz (plain arrays)", ("onnx", "torch", "npz"))
    out: str = option("model.onnx", "output file")
    overwrite: bool = option(False, "replace OUT if it exists")
    debug: bool = option(False, "show Python tracebacks on errors")

    def validate(self):
        pass
