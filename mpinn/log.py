"""Rank-0 output, decided once at construction: progress on stdout, metrics.jsonl in the run
folder. Call sites stay unconditional; on other ranks every call is a no-op except warnings, which
any rank may raise and which name their rank."""
import json
import os
import sys


class Log:
    def __init__(self, rank=0, size=1, quiet=False):
        self.rank, self.size = rank, size
        self.active = rank == 0 and not quiet
        self._metrics = None

    def info(self, message):
        if self.active:
            print(message, flush=True)

    def warn(self, message):
        where = f" (rank {self.rank})" if self.size > 1 else ""
        print(f"mpinn: warning{where}: {message}", file=sys.stderr, flush=True)

    def open_metrics(self, path, append):
        """Start writing JSON lines to path (rank 0 only); append when resuming. Each record is one
        write(2) of one whole line to an O_APPEND file, so lines are never torn or interleaved."""
        if self.rank == 0:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
            self._metrics = os.open(path, flags, 0o644)

    def metrics(self, record):
        if self._metrics is not None:
            os.write(self._metrics, (json.dumps(record) + "\n").encode())

    def close(self):
        if self._metrics is not None:
            os.close(self._metrics)
            self._metrics = None
