"""What schedulers send at the time limit (SIGTERM) and users press (SIGINT): the first one asks
the training loop to stop after the current step, write a final checkpoint and exit; if that has
not happened within the grace period, or a second signal comes, the process exits at once (the
previous checkpoint stays whole: checkpoints are written atomically)."""
import contextlib
import os
import signal
import sys

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self, grace_seconds, rank):
        self.signum = None
        self.grace, self.rank = int(grace_seconds), rank
        self._previous = {s: signal.signal(s, self._on_signal) for s in HANDLED}

    def _on_signal(self, signum, frame):
        if self.signum is not None:  # a second signal: no more waiting
            os._exit(128 + signum)
        self.signum = signum
        if self.grace > 0:
            signal.signal(signal.SIGALRM, self._on_alarm)
            signal.alarm(self.grace)

    def _on_alarm(self, signum, frame):
        print(
            f"mpinn: rank {self.rank}: no final checkpoint within the {self.grace} s grace period "
            "after the signal; exiting (the previous checkpoint is intact)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + (self.signum or signal.SIGTERM))

    @property
    def requested(self):
        return self.signum is not None

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else "a signal"

    def exit_code(self):
        return 128 + (self.signum or signal.SIGTERM)

    def restore(self):
        signal.alarm(0)
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class NoStopRequest:
    requested = False
    signum = None

    def restore(self):
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGINT) as an exception: what a command was writing is removed on the way out
    (its `finally` blocks run), where the default SIGTERM ended the process and left the hidden
    temporary file."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Held:
    depth = 0        # > 0 inside signals_held()
    signum = None    # a signal that came meanwhile


def raise_on_signals():
    """Commands that do not handle signals themselves end on SIGTERM as on Ctrl-C (train and
    sweep install their own StopRequest, and put this back after)."""
    def handler(signum, frame):
        if _Held.depth:
            _Held.signum = signum
        else:
            raise Terminated(signum)
    for s in HANDLED:
        signal.signal(s, handler)


@contextlib.contextmanager
def signals_held():
    """Around calls into HDF5 that may call back into Python (h5py writing through a file
    object): an exception raised inside such a callback is swallowed by h5py, and the command
    went on to rename a half-written file into place. A signal that comes meanwhile is raised
    when the block ends. Hold nothing that may block on another rank: that rank may be gone."""
    _Held.depth += 1
    try:
        yield
    finally:
        _Held.depth -= 1
    if not _Held.depth and _Held.signum is not None:
        signum, _Held.signum = _Held.signum, None
        raise Terminated(signum)
