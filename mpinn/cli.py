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

from . import __version__
from .config import (BenchConfig, ConvertConfig, DoctorConfig, EvaluateConfig, ExportConfig,
                     InspectConfig, JobsConfig, PredictConfig, ReportConfig, ScaleConfig,
                     SweepConfig, SynthConfig, TrainConfig, build, load_toml)
from .errors import AgreedExit, MpinnError, UsageError
from .runtime.launch import mis_launch
from .runtime.signals import Terminated, raise_on_signals


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see --help)")


# command -> (module, function): imported only when that command runs, so `mpinn jobs` never
# loads Numba or MPI
RUNNERS = {
    "train": ("train", "run"), "evaluate": ("evaluate", "run_evaluate"),
    "predict": ("evaluate", "run_predict"), "bench": ("hpc.bench", "run"),
    "scale": ("hpc.scale", "run"), "report": ("hpc.report", "run"), "jobs": ("hpc.jobs", "run"),
    "sweep": ("sweep.run", "run"), "doctor": ("hpc.doctor", "run"),
    "data synth": ("tools.datatools", "run_synth"),
    "data inspect": ("tools.datatools", "run_inspect"),
    "data convert": ("tools.convert", "run"), "export": ("tools.export", "run"),
}


def _command_runner(name):
    module, function = RUNNERS[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)


COMMANDS = {
    "train": (TrainConfig, "train an MLP data-parallel over all MPI ranks"),
    "evaluate": (EvaluateConfig, "loss and accuracy of a checkpoint on a data file"),
    "predict": (PredictConfig, "write a checkpoint's predictions for a data file"),
    "sweep": (SweepConfig, "train many configurations at once: groups of ranks take trials of a "
                           "grid one after another (task parallelism)"),
    "bench": (BenchConfig, "time training steps on synthetic data, phase by phase"),
    "scale": (ScaleConfig, "run a strong or weak scaling series (or a ranks x threads study) with mpiexec, then the report"),
    "report": (ReportConfig, "scaling report (tables, model, plots) from bench JSON results"),
    "doctor": (DoctorConfig, "check the launch, MPI, cores and binding, BLAS, memory, disk and "
                             "the network from inside a job, with warnings to act on"),
    "jobs": (JobsConfig, "write a ready SLURM or PBS job file for training or a scaling study"),
    "data synth": (SynthConfig, "write a classification data set of any size from a random "
                                "teacher network"),
    "data inspect": (InspectConfig, "shapes, dtypes, chunking, value ranges, NaN counts and class "
                                    "balance of an HDF5 file"),
    "data convert": (ConvertConfig, "NumPy .npz, CSV or MNIST IDX into mpinn's HDF5 layout, "
                                    "streaming; optional stratified train/test split"),
    "export": (ExportConfig, "write a checkpoint's network as ONNX, a PyTorch state dict or npz"),
}
# Commands that run as one process and launch or read MPI runs themselves: they must not
# initialise MPI (a singleton MPI process that starts mpiexec is fragile).
DRIVERS = ("scale", "report", "jobs", "data", "export")


# `doctor` reports a mis-launch among its findings instead of refusing to run
NO_LAUNCH_CHECK = ("doctor",)


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
            flag = "--" + f.name.replace("_", "-")
            text = f.metadata["help"]
            if "(default" not in text:  # the help text may say the default in words already
                text += f" (default: {f.default!r})"
            if f.metadata.get("positional"):
                p.add_argument(f.name, choices=f.metadata["choices"], help=f.metadata["help"],
                               metavar=None if f.metadata["choices"] else f.name.upper())
            elif f.type in (bool, "bool"):
                p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
            else:
                if f.name == "resume" and f.type is str:  # --resume, --resume auto, --no-resume
                    p.add_argument(flag, dest=f.name, nargs="?", const="yes",
                                   choices=f.metadata["choices"], default=argparse.SUPPRESS,
                                   help=text)
                    p.add_argument("--no-resume", dest=f.name, action="store_const", const="no",
                                   default=argparse.SUPPRESS, help="start a new run (the default)")
                    continue
                if f.name == "shuffle":  # --no-shuffle: the short way to say --shuffle none
                    p.add_argument("--no-shuffle", dest="shuffle", action="store_const",
                                   const="none", default=argparse.SUPPRESS,
                                   help="keep file order (same as --shuffle none)")
                typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
                p.add_argument(flag, dest=f.name, type=typ, choices=f.metadata["choices"],
                               default=argparse.SUPPRESS, help=text,
                               metavar=None if f.metadata["choices"] else f.name.upper())
    return parser


def parse(argv):
    """-> (command, config, explicitly set keys). Raises UsageError on any bad option or key."""
    ns = vars(build_parser().parse_args(argv))
    command = ns.pop("command")
    if f"{command}_command" in ns:
        command = f"{command} {ns.pop(f'{command}_command')}"
    cls = COMMANDS[command][0]
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
    if command not in NO_LAUNCH_CHECK and command_word not in DRIVERS:
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
