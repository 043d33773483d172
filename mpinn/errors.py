"""Errors that end a run with one clear line and a chosen exit status, no traceback:

    UsageError        bad input (option, config, data file, checkpoint)          exit 2
    RunError          the run cannot go on (checkpoint write failed, diverged)   exit 1 or its own
Anything else that escapes is a bug or a fault: one message naming the rank, MPI Abort, exit 1."""


class MpinnError(Exception):
    exit_code = 1


class UsageError(MpinnError):
    exit_code = 2


class RunError(MpinnError):
    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


def raise_usage(message):
    """Raise a UsageError (for comm.checked, which runs a callable on every rank)."""
    raise UsageError(message)


class AgreedExit(SystemExit):
    """Raised on every rank after a checked phase failed somewhere; the message is already out
    (printed once by the failing rank) and every rank holds it too, for a caller that records it."""

    def __init__(self, code, message=""):
        super().__init__(code)
        self.message = message
