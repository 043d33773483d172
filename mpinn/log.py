"""Rank-0 output, decided once at construction: progress on stdout, metrics.jsonl in the run folder
(and any sink rank 0 adds, e.g. TensorBoard's). Call sites stay unconditional; on other ranks
every call is a no-op except warnings, which any rank may raise and which name their rank."""
import json
import os
import sys
import time

from .errors import RunError, UsageError
from .outputs import written_whole
from .runtime.launch import watched_on_a_terminal


class Log:
    def __init__(self, rank=0, size=1, quiet=False, progress="lines"):
        self.rank, self.size = rank, size
        self.active = rank == 0 and not quiet
        self._metrics = None
        self.sinks = []  # more receivers of each metrics record (rank 0's: TensorBoard)
        # a live progress bar only where a person watches (a terminal, also through mpiexec),
        # not in job logs
        self.bar = self.active and (progress == "bar" or (
            progress == "auto" and watched_on_a_terminal(sys.stdout.isatty())))
        self._bar_shown, self._bar_time = False, 0.0

    def info(self, message):
        if self.active:
            if self._bar_shown:  # the message replaces the bar's line; the bar comes back
                print("\r\033[K", end="")
                self._bar_shown = False
            print(message, flush=True)

    def progress(self, epoch, epochs, done, steps, rate, eta_s):
        """The epoch's progress bar, at most 10 times a second (rank 0 on a terminal only)."""
        if not self.bar or time.monotonic() - self._bar_time < 0.1:
            return
        self._bar_time = time.monotonic()
        width = 30
        full = int(width * done / max(steps, 1))
        eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0)))
        print(f"\repoch {epoch}/{epochs} [{'#' * full}{'.' * (width - full)}] "
              f"{100 * done / max(steps, 1):3.0f}%  {rate:,.0f} samples/s  ETA {eta}\033[K",
              end="", flush=True)
        self._bar_shown = True

    def warn(self, message):
        where = f" (rank {self.rank})" if self.size > 1 else ""
        print(f"mpinn: warning{where}: {message}", file=sys.stderr, flush=True)

    def open_metrics(self, path, append, from_step=None):
        """Start writing JSON lines to path (rank 0 only); append when resuming. Each record is one
        write(2) of one whole line to an O_APPEND file, so lines are never torn or interleaved.
        from_step: the step a resumed run restarts at; the records of later steps (written after
        its checkpoint by the run that was stopped, and redone now) are dropped first."""
        if self.rank == 0:
            if append and from_step is not None:
                drop_records_after(path, from_step)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
            self._metrics_path = path
            try:
                self._metrics = os.open(path, flags, 0o644)
            except OSError as e:
                raise RunError(f"cannot write metrics {path}: {e.strerror or e}") from None

    def metrics(self, record):
        for sink in self.sinks:
            sink(record)
        if self._metrics is not None:
            try:
                os.write(self._metrics, (json.dumps(record) + "\n").encode())
            except OSError as e:  # a full disk: say which file, not just errno 28
                raise RunError(f"cannot write metrics {self._metrics_path}: "
                               f"{e.strerror or e}") from None

    def close(self):
        if self._metrics is not None:
            os.close(self._metrics)
            self._metrics = None


def drop_records_after(path, step):
    """Rewrite the metrics file at `path` (whole, then renamed) without the records of steps past
    `step`, and without a torn last line; nothing to do when there is none."""
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines(keepends=True)
    except FileNotFoundError:
        return
    except OSError as e:
        raise RunError(f"cannot read metrics {path}: {e.strerror or e}") from None

    def kept(line):
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:  # a line torn by a crash
            return False
    keep = [line for line in lines if kept(line)]
    if len(keep) == len(lines):
        return
    try:
        with written_whole(path, "metrics") as tmp, open(tmp, "wb") as fh:
            fh.writelines(line if line.endswith(b"\n") else line + b"\n" for line in keep)
    except UsageError as e:
        raise RunError(str(e)) from None
