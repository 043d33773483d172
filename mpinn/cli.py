"""Command line: `mpinn train|evaluate|predict`, options generated from the config dataclasses,
`--config FILE` (TOML) underneath the command line, and the one place errors become exit codes.

Error policy (the job never hangs):
  * bad options or config are found identically on every rank: rank 0 prints one line, all exit 2;
  * a phase that can fail on some ranks only runs under comm.checked(): one line, all exit 2;
  * anything else on any rank: one message naming the rank and cause, then MPI Abort (exit 1).
"""
import argparse
import contextlib
import dataclasses
import importlib
import io
import os
import signal
import sys
import traceback
from dataclasses import dataclass

from . import __version__
from .config import (BenchConfig, ConvertConfig, DoctorConfig, EvaluateConfig, ExportConfig,
                     InspectConfig, JobsConfig, PredictConfig, ReportConfig, ScaleConfig,
                     StatsConfig, SweepConfig, SynthConfig, TrainConfig)
from .errors import AgreedExit, MpinnError, UsageError
from .options import build, flag_type, load_toml
from .runtime.launch import mis_launch
from .runtime.signals import Terminated, raise_on_signals


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see --help)")


@dataclass(frozen=True)
class Command:
    """A command: its options, what runs it ("module:function", imported only when the command
    runs, so `mpinn jobs` never loads Numba or MPI), its summary for --help, whether it runs as
    one process that must not initialise MPI (it launches or reads MPI runs itself: a singleton
    MPI process that starts mpiexec is fragile), and whether a mis-launch stops it (`doctor`
    reports one among its findings instead)."""
    options: type
    runs: str
    summary: str
    one_process: bool = False
    checks_launch: bool = True

    def __iter__(self):  # (options, summary)
        return iter((self.options, self.summary))


COMMANDS = {
    "train": Command(TrainConfig, "train:run", "train an MLP data-parallel over all MPI ranks"),
    "evaluate": Command(EvaluateConfig, "evaluate:run_evaluate",
                        "loss and accuracy of a checkpoint on a data file"),
    "predict": Command(PredictConfig, "evaluate:run_predict",
                       "write a checkpoint's predictions for a data file"),
    "sweep": Command(SweepConfig, "sweep.run:run", "train many configurations at once: groups of "
                     "ranks take trials of a grid one after another (task parallelism)"),
    "bench": Command(BenchConfig, "hpc.bench:run",
                     "time training steps on synthetic data, phase by phase"),
    "scale": Command(ScaleConfig, "hpc.scale:run", "run a strong or weak scaling series (or a "
                     "ranks x threads study) with mpiexec, then the report", one_process=True),
    "report": Command(ReportConfig, "hpc.report:run", "scaling report (tables, model, plots) "
                      "from bench JSON results", one_process=True),
    "doctor": Command(DoctorConfig, "hpc.doctor:run", "check the launch, MPI, cores and binding, "
                      "BLAS, memory, disk and the network from inside a job, with warnings to act "
                      "on", checks_launch=False),
    "jobs": Command(JobsConfig, "hpc.jobs:run", "write a ready SLURM or PBS job file for "
                    "training or a scaling study", one_process=True),
    "data synth": Command(SynthConfig, "tools.datatools:run_synth", "write a classification "
                          "data set of any size from a random teacher network", one_process=True),
    "data inspect": Command(InspectConfig, "tools.datatools:run_inspect", "shapes, dtypes, "
                            "chunking, value ranges, NaN counts and class balance of an HDF5 "
                            "file", one_process=True),
    "data stats": Command(StatsConfig, "tools.datatools:run_stats", "per-column count, mean, "
                          "standard deviation, min and max of a file's inputs (and float "
                          "targets): what --scale-inputs/--scale-targets would fit",
                          one_process=True),
    "data convert": Command(ConvertConfig, "tools.convert:run", "NumPy .npz, CSV or MNIST IDX "
                            "into mpinn's HDF5 layout, streaming; optional stratified "
                            "train/test split", one_process=True),
    "export": Command(ExportConfig, "tools.export:run", "write a checkpoint's network as ONNX, a "
                      "PyTorch state dict or npz", one_process=True),
}
# the first words of the one-process commands (the command line is read before MPI starts)
DRIVERS = tuple(dict.fromkeys(name.split()[0] for name, c in COMMANDS.items() if c.one_process))


def _command_runner(name):
    module, function = COMMANDS[name].runs.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)


class _OneProcess:
    rank, size, is_root = 0, 1, True


def build_parser():
    parser = _Parser(prog="mpinn", description="Train dense neural networks over MPI ranks. "
                     "Launch with mpirun/mpiexec/srun, e.g. `mpirun -n 8 python -m mpinn train`.")
    parser.add_argument("--version", action="version", version=f"mpinn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    groups = {}
    for name, (cls, summary) in COMMANDS.items():
        if " " in name:  # "data synth": a sub-command of the "data" group
            group, name = name.split(" ", 1)
            if group not in groups:
                g = sub.add_parser(group, help=f"{group} tools: " + ", ".join(
                    c.split(" ", 1)[1] for c in COMMANDS if c.startswith(group + " ")))
                groups[group] = g.add_subparsers(dest=f"{group}_command", required=True,
                                                 metavar="COMMAND", parser_class=_Parser)
            p = groups[group].add_parser(name, help=summary, description=summary)
        else:
            p = sub.add_parser(name, help=summary, description=summary)
        p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                       help="TOML file with any of these options as keys (underscores or dashes); "
                            "the command line wins")
        for f in dataclasses.fields(cls):
            add_option(p, f)
    return parser


def add_option(parser, f):
    """The argparse option of one config field, as its metadata describes it."""
    meta, flag = f.metadata, "--" + f.name.replace("_", "-")
    text = meta["help"]
    if "(default" not in text:  # the help text may say the default in words already
        text += f" (default: {f.default!r})"
    if meta.get("positional"):
        parser.add_argument(f.name, choices=meta["choices"], help=meta["help"],
                            metavar=None if meta["choices"] else f.name.upper())
        return
    if flag_type(f) is bool:
        parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=text)
        return
    extra = {"nargs": "?", "const": meta["bare"]} if meta.get("bare") else {}
    parser.add_argument(flag, dest=f.name, type=flag_type(f), choices=meta["choices"],
                        default=argparse.SUPPRESS, help=text,
                        metavar=None if meta["choices"] else f.name.upper(), **extra)
    if meta.get("negative"):  # --no-resume, --no-shuffle: a short way to say one value
        value, words = meta["negative"]
        parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=value,
                            default=argparse.SUPPRESS, help=words)


def parse(argv):
    """-> (command, config, explicitly set keys). Raises UsageError on any bad option or key."""
    ns = vars(build_parser().parse_args(argv))
    command = ns.pop("command")
    if f"{command}_command" in ns:
        command = f"{command} {ns.pop(f'{command}_command')}"
    cls = COMMANDS[command].options
    values = load_toml(cls, ns.pop("config")) if "config" in ns else {}
    values.update(ns)
    return command, build(cls, values), frozenset(values)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command_word = next((a for a in argv if not a.startswith("-")), None)
    if command_word in DRIVERS:
        comm = _OneProcess()
    else:
        from .comm import Comm
        comm = Comm()
    # --help, --version and option errors are the same on every rank: only rank 0 speaks.
    out = sys.stdout if comm.is_root else io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            command, cfg, explicit = parse(argv)
    except UsageError as e:
        if comm.is_root:
            print(f"mpinn: error: {e}", file=sys.stderr, flush=True)
        return UsageError.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    comm.debug = cfg.debug
    if COMMANDS[command].checks_launch and not COMMANDS[command].one_process:
        problem = mis_launch(comm.size, os.environ, comm.library_version())
        if problem:  # every process of the failed launch is a rank 0: each says it once
            print(f"mpinn: error: {problem}", file=sys.stderr, flush=True)
            return UsageError.exit_code
    raise_on_signals()
    try:
        _command_runner(command)(cfg, explicit, comm)
        return 0
    except AgreedExit as e:
        return e.code
    except BaseException as e:  # noqa: B036 - any fault must end every rank, not leave them waiting
        code = e.exit_code if isinstance(e, MpinnError) else 1
        if isinstance(e, KeyboardInterrupt):
            code = 128 + getattr(e, "signum", signal.SIGINT)
        if cfg.debug:
            traceback.print_exc()
        where = f" on rank {comm.rank} of {comm.size}" if comm.size > 1 else ""
        cause = (str(e) if isinstance(e, MpinnError) else f"stopped by {e}" if
                 isinstance(e, Terminated) else f"{type(e).__name__}: {e}")
        print(f"mpinn: error{where}: {cause}", file=sys.stderr, flush=True)
        if comm.size > 1:  # a signal reached every rank: let the others clean up first
            comm.abort(code, grace_s=2.0 if isinstance(e, Terminated) else None)
        return code


def main_exit():
    """Console-script entry point (`mpinn ...`)."""
    sys.exit(main())
