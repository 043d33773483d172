"""`mpinn sweep`: task parallelism. COMM_WORLD is split into N/G groups of G ranks; each group
trains one trial at a time through `mpinn train`'s own code (train.run on the group's
communicator) in OUT/trial-NNN, then asks world rank 0's dispatcher for the next.

    mpiexec -n 8 python -m mpinn sweep --grid grid.toml --ranks-per-trial 2 --out sweeps/a \\
        --epochs 20 --data train.h5 --val-data val.h5

A trial that fails (a bad value, a NaN stop, a data error) is recorded with its reason and the
others go on; a killed rank ends the whole job, as in train. A signal stops every trial with a
checkpoint; `mpinn sweep --resume --out OUT` skips finished trials and continues stopped ones.
Only world rank 0 prints; each trial's own output goes to OUT/trial-NNN/output.log.
"""
import contextlib
import glob
import json
import os
import shutil
import sys
import time

import numpy as np

from .. import train
from ..config import SWEEP_CHANGEABLE_ON_RESUME, TrainConfig, build, check_value
from ..errors import AgreedExit, UsageError
from ..log import Log
from ..outputs import RunDirLock, prepare_run_dir, written_whole
from ..rundir import RunDir
from ..runtime.signals import NoStopRequest, StopRequest
from .grid import describe, load_trials
from .results import finished, read_result, trial_dir, write_all, write_result
from .scheduler import Dispatcher, ask

PLAN_NAME = "sweep.json"
SWEEP_FILES = (PLAN_NAME, "results.csv", "results.md", "results.png")
# what may change when a sweep is continued: where it runs and how it is watched, not what it trains
CHANGEABLE_ON_RESUME = SWEEP_CHANGEABLE_ON_RESUME


def run(cfg, explicit, world):
    log = Log(world.rank, world.size)
    size = cfg.ranks_per_trial
    world.checked(check_world, world.size, size, world.threads_supported())
    lock = world.on_root(claim_out, cfg)
    try:
        plan = world.bcast_json(world.on_root(prepare, cfg, explicit))
        code = sweep(cfg, world, log, plan, size)
    finally:
        if lock is not None:
            lock.release()
    if code:
        raise AgreedExit(code)


def check_world(ranks, size, threads):
    if ranks % size:
        raise UsageError(f"--ranks-per-trial {size} does not divide the {ranks} ranks into groups")
    if ranks > 1 and not threads:
        raise UsageError("mpinn sweep needs an MPI library initialised with MPI_THREAD_MULTIPLE "
                         "(its dispatcher is a thread on rank 0)")


def claim_out(cfg):
    """Rank 0: OUT exists (a new sweep creates it) and is locked for this sweep alone."""
    if cfg.resume and not os.path.isdir(cfg.out):
        raise UsageError(f"--resume: --out {cfg.out} is not a folder of a sweep")
    prepare_run_dir(cfg.out, "--out")
    return RunDirLock(cfg.out, "--out", "sweep")


def prepare(cfg, explicit):
    """Rank 0, before any trial: the trials (new, or the stored ones on --resume), OUT checked
    and claimed, and which trials are still to train."""
    if cfg.resume:
        plan = stored_plan(cfg, explicit)
    else:
        varied, trials = load_trials(cfg.grid, cfg.random, cfg.seed)
        base = cfg.train_values()
        plan = {"varied": varied, "trials": trials, "base": base,
                "explicit": sorted(k for k in explicit if k in base)}
        check_trials(cfg, plan)
        check_new_sweep(cfg)
        if cfg.overwrite:
            clear_sweep(cfg.out)
        with written_whole(os.path.join(cfg.out, PLAN_NAME), "--out") as tmp:
            with open(tmp, "w") as fh:
                json.dump(plan, fh, indent=1)
    for key in CHANGEABLE_ON_RESUME:  # run-time knobs: this command's, not the stored ones
        if key in plan["base"]:
            plan["base"][key] = getattr(cfg, key)
    records = [read_result(cfg.out, i) for i in range(len(plan["trials"]))]
    plan["pending"] = [i for i, r in enumerate(records) if not finished(r)]
    return plan


def check_trials(cfg, plan):
    """Every trial's options are checked as train checks them before the first trial starts: a
    bad value in the grid (lr = -1) is an error now, not a failed row after the others trained.
    What only training can tell (a missing data file, divergence) still fails that trial alone."""
    bad = []
    for index, trial in enumerate(plan["trials"]):
        try:
            trial_config(plan, trial, trial_dir(cfg.out, index), resume=False)
        except UsageError as e:
            bad.append(f"trial {index:03d} ({', '.join(f'{k}={v!r}' for k, v in trial.items())})"
                       f": {e}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise UsageError(f"{cfg.grid}: {len(bad)} of {len(plan['trials'])} trials have invalid "
                         f"options, nothing was trained: " + "; ".join(bad[:3]) + more)


def stored_plan(cfg, explicit):
    path = os.path.join(cfg.out, PLAN_NAME)
    try:
        with open(path) as fh:
            plan = json.load(fh)
    except FileNotFoundError:
        raise UsageError(f"--resume: {cfg.out} holds no sweep ({PLAN_NAME} not found)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--resume: cannot read {path}: {e}") from None
    fixed = sorted(k for k in explicit if k not in CHANGEABLE_ON_RESUME)
    if fixed:
        raise UsageError(f"--resume continues the sweep stored in {path}; "
                         f"{', '.join('--' + k.replace('_', '-') for k in fixed)} cannot change "
                         "(start a new sweep with --overwrite or another --out)")
    return plan


def check_new_sweep(cfg):
    old = [n for n in SWEEP_FILES if os.path.exists(os.path.join(cfg.out, n))]
    old += sorted(os.path.basename(p) for p in glob.glob(os.path.join(cfg.out, "trial-*")))
    if old and not cfg.overwrite:
        raise UsageError(f"--out {cfg.out} holds a sweep ({', '.join(old[:3])}"
                         f"{', ...' if len(old) > 3 else ''}); continue it with --resume, replace "
                         "it with --overwrite, or choose another --out")


def clear_sweep(out):
    for path in [os.path.join(out, n) for n in SWEEP_FILES] + glob.glob(
            os.path.join(out, "trial-*")):
        try:
            shutil.rmtree(path) if os.path.isdir(path) else (
                os.unlink(path) if os.path.exists(path) else None)
        except OSError as e:
            raise UsageError(f"--overwrite: cannot remove {path}: {e.strerror}") from None


def sweep(cfg, world, log, plan, size):
    """Every group trains trials until the dispatcher has none left; then rank 0 writes the
    results. Returns the exit status: 0, 128+signal when stopped, 1 when no trial trained."""
    t0 = time.perf_counter()
    n, groups = len(plan["trials"]), world.size // size
    log.info(f"mpinn sweep: {n} trials, {len(plan['pending'])} to train, on {world.size} rank(s) "
             f"in {groups} group(s) of {size}; run folders {cfg.out}/trial-NNN")
    group = world.split(world.rank // size, world.rank)
    # every group on a node may make its own shared window there: check /dev/shm for all of them
    group.shm_sharers = world.groups_on_node(world.rank // size)
    side = world.dup()
    stop = StopRequest(cfg.signal_grace, world.rank) if cfg.checkpoint_on_signal \
        else NoStopRequest()
    progress = Progress(log, cfg.out, plan, size)
    dispatcher = (Dispatcher(side, plan["pending"], groups, progress.started, progress.ended)
                  .start() if world.is_root else None)
    try:
        stopped = train_trials(cfg, plan, group, side, stop)
        world.barrier_idle()
        if dispatcher is not None:
            dispatcher.join()
    finally:
        stop.restore()
    stopped = int(world.allreduce_(np.array([stopped], np.int64), "max")[0])
    ok = world.on_root(summarize, cfg, log, plan, time.perf_counter() - t0, stopped,
                       default=True)
    ok = world.bcast_int(int(bool(ok)))
    return 128 + stopped if stopped else (0 if ok else 1)


def train_trials(cfg, plan, group, side, stop):
    """This group's loop: ask, train, record. Returns the signal number that stopped it, or 0."""
    finished_trial, signum = -1, 0
    while True:
        trial = group.bcast_int(ask(side, finished_trial, signum or stop.requested)
                                if group.is_root else 0)
        if trial < 0:
            return signum or (stop.signum or 0)
        record = run_trial(cfg.out, plan, trial, group)
        finished_trial = trial
        if record["status"] == "stopped":
            signum = record["exit_code"] - 128


def trial_config(plan, trial, run_dir, resume):
    """The trial's train config: the sweep's base, the trial's options (type-checked as a config
    file's keys are), its own run folder. -> (config, the options set explicitly)."""
    values = dict(plan["base"])
    where = f"trial {os.path.basename(run_dir)}"
    values.update({k: check_value(TrainConfig, k, v, where) for k, v in trial.items()})
    values.update(run_dir=run_dir, resume=bool(resume), overwrite=not resume, progress="lines")
    return build(TrainConfig, values), frozenset(plan["explicit"]) | set(trial) | {"run_dir"}


def run_trial(out, plan, index, group):
    """Train one trial on this group; its first rank writes OUT/trial-NNN/result.json."""
    t0 = time.perf_counter()
    trial, run_dir = plan["trials"][index], trial_dir(out, index)
    record = {"trial": index, "run_dir": run_dir, "status": "ok", "reason": "", "exit_code": 0,
              "options": {k: trial.get(k, plan["base"].get(k)) for k in plan["varied"]}}
    resume = 0
    if group.is_root:
        os.makedirs(run_dir, exist_ok=True)
        resume = int(os.path.exists(RunDir(run_dir).checkpoint))
    resume = group.bcast_int(resume)
    try:
        cfg, explicit = trial_config(plan, trial, run_dir, resume)
        with trial_output(run_dir, group.is_root):
            record.update(train.run(cfg, explicit, group).outcome())
    except UsageError as e:  # the same on every rank of the group: a bad value in the grid
        record.update(status="failed", reason=str(e), exit_code=e.exit_code)
    except AgreedExit as e:
        stopped = e.code in (130, 143)
        record.update(status="stopped" if stopped else "failed", reason=e.message,
                      exit_code=int(e.code))
    record["seconds"] = time.perf_counter() - t0
    if group.is_root:
        write_result(out, index, record)
    return record


@contextlib.contextmanager
def trial_output(run_dir, first):
    """The trial's output (progress lines, warnings, errors) goes to its output.log on the
    group's first rank and nowhere on the others: the terminal hears only world rank 0."""
    path = os.path.join(run_dir, "output.log") if first else os.devnull
    with open(path, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


class Progress:
    """World rank 0's lines as trials start and end (called from the dispatcher thread, so they
    go to the terminal's stdout even while a trial's output is redirected)."""

    def __init__(self, log, out, plan, size):
        self.out, self.plan, self.size = out, plan, size
        self.stdout, self.active = sys.stdout, log.active

    def say(self, line):
        if self.active:
            print(line, file=self.stdout, flush=True)

    def started(self, trial, source):
        ranks = f"rank {source}" if self.size == 1 else f"ranks {source}-{source + self.size - 1}"
        self.say(f"trial {trial:03d} started on {ranks}: {describe(self.plan['trials'][trial])}")

    def ended(self, trial):
        r = read_result(self.out, trial)
        if r is None:
            self.say(f"trial {trial:03d} ended without a result record")
            return
        shown = [k for k in r if k.startswith("val_")] + ["train_loss"]
        figures = " ".join(f"{k} {r[k]:.4f}" for k in shown if isinstance(r.get(k), (int, float)))
        detail = figures if r["status"] == "ok" else r["reason"]
        self.say(f"trial {trial:03d} {r['status']} in {r['seconds']:.1f} s: {detail}")


def summarize(cfg, log, plan, wall_seconds, stopped):
    """Rank 0: results.csv/md/png over all trials (those of earlier sessions too); the best."""
    records = []
    for i, trial in enumerate(plan["trials"]):
        r = read_result(cfg.out, i)
        records.append(r or {"trial": i, "run_dir": trial_dir(cfg.out, i), "status": "stopped",
                             "reason": "not started", "options": {
                                 k: trial.get(k, plan["base"].get(k)) for k in plan["varied"]}})
    top, key = write_all(cfg.out, records, plan["varied"], wall_seconds)
    counts = ", ".join(f"{sum(r['status'] == s for r in records)} {s}"
                       for s in ("ok", "failed", "stopped"))
    log.info(f"mpinn sweep: {len(records)} trials ({counts}) in {wall_seconds:.1f} s; results in "
             f"{os.path.join(cfg.out, 'results.md')}")
    if top is None and not stopped:
        log.info("mpinn sweep: no trial ended ok (see the reasons in results.csv)")
    if top is not None:
        log.info(f"mpinn sweep: best {top['run_dir']}: {key} {top[key]:.4f} "
                 f"({describe(top['options'])})")
    if stopped:
        log.info(f"mpinn sweep: stopped by a signal; continue with `mpinn sweep --resume --out "
                 f"{cfg.out}`")
    return top is not None or bool(stopped)
