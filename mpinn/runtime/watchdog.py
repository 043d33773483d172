"""Stall watchdog (what Horovod's stall inspector does): a thread on every rank times the current
step. When a step has taken longer than --stall-warning seconds and 10x the recent median, each
rank that is already waiting in the step's collective tells rank 0 (one small message on its own
communicator), and rank 0 reports which ranks have arrived and which have not. When a step has
taken --stall-timeout seconds, the rank that notices aborts the whole job instead of waiting
forever. Nothing is sent unless a step stalls; with both limits 0 no thread runs.
"""
import collections
import sys
import threading
import time

import numpy as np

TAG_ARRIVED = 7301
ABORT_CODE = 124


class NullWatchdog:
    def begin(self, step):
        pass

    def arrived(self):
        pass

    def end(self):
        pass

    def stop(self):
        pass


class Watchdog:
    def __init__(self, comm, warning_s, timeout_s, log):
        self.comm, self.warning, self.timeout, self.log = comm, warning_s, timeout_s, log
        self.side = comm.dup() if comm.size > 1 and comm.threads_supported() else None
        self.step, self.started, self.in_collective = 0, None, False
        self.recent = collections.deque(maxlen=20)
        self.reported = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mpinn-watchdog", daemon=True)
        self._thread.start()

    # called by the training loop and the engines (cheap attribute writes)
    def begin(self, step):
        self.step, self.in_collective, self.started = step, False, time.perf_counter()

    def arrived(self):
        self.in_collective = True

    def end(self):
        if self.started is not None:
            self.recent.append(time.perf_counter() - self.started)
        self.started = None

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2)

    # the thread
    def threshold(self):
        median = float(np.median(self.recent)) if self.recent else 0.0
        return max(self.warning, 10 * median)

    def _watch(self):
        period = min(x for x in (self.warning, self.timeout, 1.0) if x > 0) / 4
        while not self._stop.wait(period):
            started, step = self.started, self.step
            if started is None:
                continue
            elapsed = time.perf_counter() - started
            if self.timeout and elapsed > self.timeout:
                print(f"mpinn: error on rank {self.comm.rank}: step {step} has taken "
                      f"{elapsed:.0f} s, more than --stall-timeout {self.timeout:g} s; aborting the "
                      "job", file=sys.stderr, flush=True)
                self.comm.abort(ABORT_CODE)
            if self.warning and elapsed > self.threshold() and self.reported != step:
                self.reported = step
                self._report(step, elapsed)

    def _report(self, step, elapsed):
        rank, size = self.comm.rank, self.comm.size
        if self.side is None:  # no MPI from threads: each rank says where it is
            where = "waiting in the collective" if self.in_collective else "not in the collective"
            print(f"mpinn: warning (rank {rank}): step {step} has taken {elapsed:.1f} s, {where}",
                  file=sys.stderr, flush=True)
            return
        if rank != 0:
            if self.in_collective:
                self.side.send_ints_([step, rank], 0, TAG_ARRIVED)
            return
        arrived = {0} if self.in_collective else set()
        deadline = time.perf_counter() + min(max(self.warning, 1.0), 5.0)
        while time.perf_counter() < deadline and len(arrived) < size:
            msg = self.side.poll_ints(2, TAG_ARRIVED)
            if msg is None:
                time.sleep(0.05)
            elif int(msg[0]) == step:
                arrived.add(int(msg[1]))
        missing = [r for r in range(size) if r not in arrived]
        print(f"mpinn: warning: stall at step {step}: {elapsed:.1f} s so far (recent steps "
              f"{1e3 * (float(np.median(self.recent)) if self.recent else 0):.1f} ms); ranks "
              f"waiting in the collective: {_ranges(sorted(arrived))}; ranks that have not "
              f"arrived: {_ranges(missing)}", file=sys.stderr, flush=True)


def _ranges(ranks):
    if not ranks:
        return "none"
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)
