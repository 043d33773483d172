"""What --resume keeps and checks: --resume auto's choice, the checkpoint a run starts from (a
damaged one's fallback), the run's own data and options from it (those kept on resume; an explicit
option that contradicts them is an error), and that its data files are the ones it started on."""
import os

from . import checkpoint, data
from .config import KEPT_ON_RESUME, Resume, parse_hidden
from .errors import UsageError
from .rundir import RunDir
from .session import data_paths


def auto_resume(options, comm, log):
    """--resume auto: continue when RUN_DIR holds a checkpoint, else start a new run there (what a
    job that may be requeued asks for; leftovers of an attempt that never checkpointed go)."""
    run_dir = RunDir(options.run.run_dir)
    found = comm.bcast_int(int(comm.is_root and bool(run_dir.saved_checkpoints())))
    log.info("mpinn train: --resume auto: " + ("continuing the run in" if found else
                                                "no checkpoint yet, a new run in") +
             f" {run_dir}")
    return options.replace(resume=Resume.YES if found else Resume.NO, overwrite=not found)


def resumed_options(options, explicit, ckpt):
    """The options with the run's own data and options from its checkpoint (those kept on
    resume); an explicit option that contradicts them is an error."""
    saved, updates, mine_all = ckpt.config, {}, options.flat()
    # the data files as this command line means them: --data '' is the bundled digits (so a job
    # file's empty DATA resumes a run on the bundled data), its --val-data '' the bundled test set
    resolved = dict(zip(("data", "val_data"), (p or "" for p in data_paths(
        options.data.data, options.data.val_data))))
    for key in KEPT_ON_RESUME:
        if key not in saved:
            continue
        mine, theirs = resolved.get(key, mine_all[key]), saved[key]
        if key in explicit and not same_setting(key, mine, theirs):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {mine!r} differs from the run's {theirs!r}: --resume "
                             "continues a run on its own data and options. Drop the option, or "
                             "start a new run (--overwrite, or another --run-dir)")
        updates[key] = theirs
    check_data_identity(saved)
    return options.replace(**updates)


def check_data_identity(saved):
    """The run's data files must be the ones it started on (same size and fingerprint): a file
    replaced under the same name is refused, as a different --data is."""
    for path, identity in saved.get("data_identity", {}).items():
        now = data.file_identity(path)
        if now != identity:
            raise UsageError(f"the run's data file {path} has changed since the run started "
                             f"({identity[0]:,} bytes, fingerprint {identity[1]}; now {now[0]:,} "
                             f"bytes, {now[1]}): --resume continues a run on its own data. "
                             "Restore the file, or start a new run (--overwrite, or another "
                             "--run-dir)")


def same_setting(key, mine, theirs):
    if key in ("data", "val_data"):
        files = lambda spec: [os.path.realpath(p) for p in data.data_files(spec)]  # noqa: E731
        return bool(mine) == bool(theirs) and (not mine or files(mine) == files(theirs))
    if key == "hidden":
        return parse_hidden(mine) == parse_hidden(theirs)
    return mine == theirs


def start_checkpoint(run, run_dir, log):
    """The checkpoint a run starts from (rank 0 only), or None. On --resume a damaged or missing
    checkpoint.h5 falls back to the newest intact step checkpoint (--keep-checkpoints), saying
    so."""
    if run.resume is not Resume.YES:
        return checkpoint.load(run.init) if run.init else None
    path = run_dir.checkpoint
    try:
        if not os.path.exists(path):
            raise UsageError(f"--resume: no checkpoint at {path}")
        return checkpoint.load(path)
    except UsageError as problem:
        for older in reversed(run_dir.step_checkpoints()):
            try:
                ckpt = checkpoint.load(older)
            except UsageError:
                continue
            log.warn(f"{problem}; resuming from {older} (step {ckpt.global_step}) instead")
            return ckpt
        raise
