"""`train --timeline FILE`: a Chrome-trace JSON of what every rank did when (one lane per rank:
data, forward, backward, wait, allreduce, optimizer, evaluate, checkpoint). Opens in Perfetto
(ui.perfetto.dev) or chrome://tracing.

Each rank records (event, start, end) in memory, relative to a clock origin taken right after a
barrier; at the end one Gatherv brings every rank's events to rank 0, which writes the file. With
the timeline off, `NullTimeline.add` does nothing.
"""
import json
import os
import time

import numpy as np

from ..outputs import text_written_whole

EVENTS = ("data", "forward", "backward", "wait", "allreduce", "optimizer", "evaluate", "checkpoint")
CODE = {name: i for i, name in enumerate(EVENTS)}
MAX_EVENTS = 500_000  # per rank; a longer run keeps its first events


class NullTimeline:
    enabled = False

    def start(self):
        pass

    def add(self, name, t0, t1):
        pass


class Timeline:
    enabled = True

    def __init__(self):
        self.origin = time.perf_counter()
        self.events = []
        self.dropped = 0

    def start(self):
        """Set the clock origin (call right after a barrier so ranks share it)."""
        self.origin = time.perf_counter()

    def add(self, name, t0, t1):
        if len(self.events) < MAX_EVENTS:
            self.events.append((CODE[name], t0 - self.origin, t1 - t0))
        else:
            self.dropped += 1

    def write(self, comm, path):
        """Collective: gather all ranks' events to rank 0, which writes the trace to path (whole
        or not at all: a failed write is rank 0's error, agreed by the caller)."""
        mine = np.array(self.events, np.float64).reshape(-1, 3)
        counts = np.zeros(comm.size, np.int64)
        counts[comm.rank] = mine.size
        comm.allreduce_(counts)
        everything = np.empty(int(counts.sum()), np.float64) if comm.is_root else None
        comm.gatherv_(mine.ravel(), everything, counts)
        if not comm.is_root:
            return
        trace = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": r,
                  "args": {"name": f"rank {r}"}} for r in range(comm.size)]
        start = 0
        for r, n in enumerate(counts):
            for code, t0, dur in everything[start:start + n].reshape(-1, 3):
                trace.append({"name": EVENTS[int(code)], "cat": "mpinn", "ph": "X", "pid": 0,
                              "tid": r, "ts": t0 * 1e6, "dur": dur * 1e6})
            start += n
        with text_written_whole(path, "--timeline") as fh:
            json.dump({"traceEvents": trace, "displayTimeUnit": "ms",
                       "otherData": {"tool": "mpinn", "ranks": comm.size,
                                     "events_dropped_on_rank_0": self.dropped}}, fh)


def is_trace(path):
    """True when path holds a trace this module wrote (its closing otherData names mpinn): a
    resumed run may replace its own earlier trace without --overwrite."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 300))
            tail = fh.read()
    except OSError:
        return False
    return b'"otherData": {"tool": "mpinn"' in tail
