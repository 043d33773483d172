"""The user-facing error type: a clear one-line message about bad input, exit status 2."""


class UsageError(Exception):
    """Bad input from the user (option, config, data file, checkpoint): said in one line, no
    traceback, exit status 2. Anything else that escapes is a bug or a fault and exits 1."""

    exit_code = 2


class AgreedExit(SystemExit):
    """Raised on every rank after a checked phase failed somewhere; the message is already out."""
