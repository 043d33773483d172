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
        """Start writing JSON lines to path (rank 0 only); append when resuming."""
        if self.rank == 0:
            self._metrics = open(path, "a" if append and os.path.exists(path) else "w")

    def metrics(self, record):
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def close(self):
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
