"""Where mpinn writes, and the promise that nothing is lost: every output path is checked before any
work is done (its folder exists, it is not a folder, an existing file is replaced only with
--overwrite), files appear whole (written under a temporary name, then renamed), and a run folder
belongs to one run at a time (an OS lock held by rank 0 for the whole run; a crashed run leaves no
stale lock, since the lock dies with its process)."""
import contextlib
import fcntl
import os
import shutil
import socket

from .errors import UsageError

RUN_FILES = ("checkpoint.h5", "metrics.jsonl", "best.h5", "checkpoints")
LOCK_NAME = ".mpinn-lock"


def check_output_path(path, option="--out", overwrite=True):
    """An output file's folder must exist, the path must not be a folder, and an existing file is
    replaced only when overwrite is set."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: directory {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a directory")
    if not overwrite and os.path.exists(path):
        raise UsageError(f"{option} {path} exists; choose another path or pass --overwrite to "
                         "replace it")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: directory {folder} is not writable")


@contextlib.contextmanager
def written_whole(path, option="--out"):
    """Yields a temporary path beside `path` to write; when the block succeeds it is renamed to
    `path`, so a reader never sees half a file and a failure leaves the old file (if any) as it
    was. A failed write is one clear error."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"cannot write {option} {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prepare_run_dir(path, option="--run-dir"):
    """Create the run folder (and its parents) or say why it cannot be used."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {option} {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path} is not writable")


class RunDirLock:
    """An exclusive flock on RUN_DIR/.mpinn-lock for as long as this object lives (rank 0 only).
    The file names the holder (pid and host) for the error a second run sees."""

    def __init__(self, run_dir, option="--run-dir", what="training"):
        path = os.path.join(run_dir, LOCK_NAME)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise UsageError(f"{option} {run_dir} is in use by another {what} ({holder}); "
                             f"wait for it to end or choose another {option}") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def run_files(run_dir):
    """The files and folders of a previous run in RUN_DIR (empty when there is none)."""
    return [n for n in RUN_FILES if os.path.exists(os.path.join(run_dir, n))]


def check_new_run(run_dir, resume, overwrite):
    """A new run may not fall silently on an old one's files."""
    found = run_files(run_dir)
    if found and not resume and not overwrite:
        raise UsageError(f"--run-dir {run_dir} holds a run ({', '.join(found)}); continue it with "
                         "--resume, replace it with --overwrite, or choose another --run-dir")


def clear_run(run_dir):
    """Remove a previous run's files (--overwrite), once every input of the new run is checked."""
    for name in run_files(run_dir):
        path = os.path.join(run_dir, name)
        try:
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        except OSError as e:
            raise UsageError(f"--overwrite: cannot remove {path}: {e.strerror}") from None
