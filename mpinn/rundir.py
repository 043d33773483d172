"""A run folder and everything in it: the names of the files a run writes (checkpoint.h5,
metrics.jsonl, best.h5, checkpoints/step-NNNNNNN.h5), its lock, what it holds, and the set-aside
of a run that --overwrite replaces (moved into .mpinn-replaced until the new run's first
checkpoint, put back if the new run fails before it).

Only rank 0 touches the folder; the training loop and the assembly ask a RunDir for names.
"""
import glob
import os
import shutil

from . import checkpoint
from .errors import UsageError
from .outputs import LOCK_NAME, RunDirLock, prepare_run_dir

SET_ASIDE = ".mpinn-replaced"  # the previous run's files while --overwrite has no checkpoint yet


class RunDir:
    CHECKPOINT, METRICS, BEST, STEPS = "checkpoint.h5", "metrics.jsonl", "best.h5", "checkpoints"
    RUN_FILES = (CHECKPOINT, METRICS, BEST, STEPS)  # what makes a folder hold a run

    def __init__(self, path):
        self.path = path
        self.lock = None  # rank 0's RunDirLock while the run lives

    def __str__(self):
        return self.path

    def file(self, name):
        return os.path.join(self.path, name)

    @property
    def checkpoint(self):
        return self.file(self.CHECKPOINT)

    @property
    def metrics(self):
        return self.file(self.METRICS)

    @property
    def best(self):
        return self.file(self.BEST)

    @property
    def steps(self):
        """The folder of --keep-checkpoints' step-NNNNNNN.h5 files."""
        return self.file(self.STEPS)

    @property
    def set_aside_path(self):
        return self.file(SET_ASIDE)

    def ours(self):
        """Every path of the run's own (never an output of something else)."""
        return [self.file(name) for name in (*self.RUN_FILES, LOCK_NAME)]

    def saved_checkpoints(self):
        """checkpoint.h5 and the step checkpoints that exist, newest step last."""
        return [p for p in [self.checkpoint] + glob.glob(os.path.join(self.steps, "step-*.h5"))
                if os.path.exists(p)]

    def step_checkpoints(self):
        return checkpoint.step_checkpoints(self.steps)

    def run_files(self):
        """The files and folders of a previous run here (empty when there is none)."""
        return [n for n in self.RUN_FILES if os.path.exists(self.file(n))]

    def claim(self, resume, overwrite):
        """Rank 0: create and lock the folder; a new run may not land on an old one unasked.
        Returns a note to say (a recovered --overwrite), or None."""
        prepare_run_dir(self.path)
        self.lock = RunDirLock(self.path)
        try:
            note = self.recover_set_aside()
            self.check_new_run(resume, overwrite)
        except UsageError:
            self.release()
            raise
        return note

    def release(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def check_new_run(self, resume, overwrite):
        """A new run may not fall silently on an old one's files."""
        found = self.run_files()
        if found and not resume and not overwrite:
            raise UsageError(f"--run-dir {self.path} holds a run ({', '.join(found)}); continue "
                             "it with --resume, replace it with --overwrite, or choose another "
                             "--run-dir")

    def set_aside(self):
        """--overwrite, once every input of the new run is checked: move the previous run's files
        into RUN_DIR/.mpinn-replaced, where they stay until the new run has written its first
        checkpoint (drop_set_aside); a new run that fails before that gets them back
        (restore_set_aside), so a failed --overwrite never leaves the folder with neither run.
        Returns whether there was a run to move."""
        found = self.run_files()
        if not found:
            return False
        aside = self.file(SET_ASIDE)
        try:
            os.makedirs(aside, exist_ok=True)
            for name in found:
                os.replace(self.file(name), os.path.join(aside, name))
        except OSError as e:
            raise UsageError(f"--overwrite: cannot move the previous run's files aside into "
                             f"{aside}: {e.strerror}") from None
        return True

    def drop_set_aside(self):
        """The new run has a checkpoint: the previous run's files go for good."""
        shutil.rmtree(self.file(SET_ASIDE), ignore_errors=True)

    def restore_set_aside(self):
        """The new run ended before its first checkpoint: the previous run's files go back (the
        new run's files of the same names, such as its metrics, are replaced by them)."""
        aside = self.file(SET_ASIDE)
        for name in os.listdir(aside):
            target = self.file(name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(aside, name), target)
        os.rmdir(aside)

    def recover_set_aside(self):
        """A run that replaced another was killed between moving the old files aside and its
        first checkpoint: put them back (or, when it did checkpoint, drop them). -> a note, or
        None."""
        aside = self.file(SET_ASIDE)
        if not os.path.isdir(aside):
            return None
        if os.path.exists(self.checkpoint):
            self.drop_set_aside()
            return None
        try:
            self.restore_set_aside()
        except OSError as e:
            raise UsageError(f"cannot restore the previous run's files from {aside}: "
                             f"{e.strerror}; move them back by hand") from None
        return (f"{self.path}: a run started with --overwrite ended before its first checkpoint; "
                "the run it was replacing is back in place")
