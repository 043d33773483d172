"""Where mpinn writes, and the promise that nothing is lost: every output path is checked before any
work is done (its folder exists, it is not a folder, an existing file is replaced only with
--overwrite), files appear whole (written under a temporary name, then renamed), and a run folder
belongs to one run at a time (an OS lock held by rank 0 for the whole run; a crashed run leaves no
stale lock, since the lock dies with its process)."""
import contextlib
import errno
import fcntl
import io
import os
import socket

import h5py

from .errors import UsageError
from .runtime.signals import signals_held

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


def temporary_path(path, pid=None):
    """The hidden name beside `path` that written_whole writes first (.NAME.tmp-PID), of this
    process or of the writer `pid`."""
    return os.path.join(os.path.dirname(os.path.abspath(path)),
                        f".{os.path.basename(path)}.tmp-{os.getpid() if pid is None else pid}")


@contextlib.contextmanager
def written_whole(path, option="--out"):
    """Yields a temporary path beside `path` to write; when the block succeeds the file is
    flushed to disk (a write the kernel still held fails here: ENOSPC on NFS, EIO) and renamed to
    `path`, so a reader never sees half a file and a failure leaves the old file (if any) as it
    was. A failed write is one clear error naming the path. Temporaries of writers that died
    (SIGKILL) beside `path` are removed first."""
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"cannot write {option} {path}: {e.strerror or e}; nothing was written "
                         "there") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_path(path):
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(path):
    """Remove .NAME.tmp-PID files beside `path` whose process is gone (a writer killed by
    SIGKILL, or on a node that went down: the PID is then not alive here either)."""
    folder, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.tmp-"
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        pid = entry[len(prefix):]
        if entry.startswith(prefix) and pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, entry))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def sink_written_whole(path, option="--out"):
    """A SafeSink on written_whole's temporary: the first failed write (a full disk) is raised
    when the block ends, in place of whatever the writer made of the garbage it read back, and
    written_whole turns it into one message naming the path."""
    with written_whole(path, option) as tmp:
        sink = SafeSink(tmp)
        try:
            yield sink
        except BaseException:
            if sink.error is None:
                raise
        finally:
            sink.close()
        if sink.error is not None:
            raise sink.error


@contextlib.contextmanager
def text_written_whole(path, option="--out", newline=None):
    """A text file to write `path` with, appearing whole or not at all (sink_written_whole)."""
    with sink_written_whole(path, option) as sink:
        with io.TextIOWrapper(io.BufferedWriter(sink), newline=newline) as fh:
            yield fh


@contextlib.contextmanager
def h5_written_whole(path, option="--out"):
    """An h5py.File to write `path` with, appearing whole or not at all (written_whole). HDF5
    holds writes in its buffers, and when the disk fills it reports the failure at close, where
    h5py cannot raise it (the file was renamed into place torn, then the process segfaulted at
    exit). So HDF5 writes through a SafeSink: the first failed write is kept, HDF5 sees success
    and closes cleanly, and the kept error is raised before anything is renamed."""
    with sink_written_whole(path, option) as sink:
        with signals_held():
            f = h5py.File(sink, "w")
        try:
            yield f  # the caller holds signals around its own writes (signals_held)
        finally:
            with signals_held():
                f.close()


class SafeSink(io.RawIOBase):
    """A binary file that never reports a failed write to its caller: the first OSError is kept
    in `error` (later writes only move the position) for the owner to raise once the caller has
    let go of the file."""

    def __init__(self, path):
        super().__init__()
        self.fh = open(path, "w+b", buffering=0)
        self.error = None

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        return self.fh.seek(pos, whence)

    def tell(self):
        return self.fh.tell()

    def readinto(self, buffer):
        return self.fh.readinto(buffer)

    def write(self, data):
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += self.fh.write(view[done:])
                return len(view)
            except OSError as e:
                self.error = e
        self.fh.seek(len(view), os.SEEK_CUR)
        return len(view)

    def truncate(self, size=None):
        try:
            return self.fh.truncate(size)
        except OSError as e:
            self.error = self.error or e
            return size

    def flush(self):
        pass

    def close(self):
        if not self.closed:
            self.fh.close()
        super().close()


def check_side_output(path, option, overwrite, inputs, ours, replaceable=lambda p: False):
    """An output written beside a run (train's --timeline): the usual checks, never one of the
    run's inputs or its run folder's files (`ours`; not even with --overwrite), and an existing
    file is replaced only with --overwrite or when replaceable(path) says it is this output's own
    kind (a resumed run's earlier trace)."""
    check_output_path(path, option)
    if not os.path.exists(path):
        return
    for other in (*inputs, *ours):
        if os.path.exists(other) and os.path.samefile(other, path):
            what = "an input of this run" if other in inputs else "a file of the run folder"
            raise UsageError(f"{option} {path} is {what} ({other}); choose another path")
    if not overwrite and not replaceable(path):
        raise UsageError(f"{option} {path} exists; choose another path or pass --overwrite to "
                         "replace it")


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
        except OSError as e:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UsageError(f"{option} {run_dir} is in use by another {what} ({holder}); "
                                 f"wait for it to end or choose another {option}") from None
            raise UsageError(lock_unsupported(run_dir, option, e)) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    note = None  # what claiming the folder found to say (a recovered --overwrite)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def lock_unsupported(run_dir, option, error):
    """The message for a file system that cannot lock (any flock failure but "held by another")."""
    name = errno.errorcode.get(error.errno, str(error.errno))
    return (f"cannot lock {option} {run_dir}: flock failed with {name} ({error.strerror}): this "
            "file system does not support file locks (Lustre mounted without -o flock, NFS "
            "without lockd?). mpinn locks the run folder so that two runs never write one "
            "folder; it needs flock that holds across nodes. Use a run folder on a file system "
            "that has it (`mpinn doctor --run-dir DIR` tests one)")


def try_lock(run_dir):
    """doctor: 'ok' when a run-folder lock can be taken in run_dir, else why not."""
    path = os.path.join(run_dir, f".mpinn-lock-probe-{os.getpid()}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        return f"failed: {e.strerror}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "ok"
    except OSError as e:
        return f"failed: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"
    finally:
        os.close(fd)
        os.unlink(path)
