"""Stall watchdog (what Horovod's stall inspector does): a thread on every rank times the current
step. When a step has taken longer than --stall-warning seconds and 10x the recent median, each
rank that is already waiting in the step's collective tells rank 0 (one small message on its own
communicator), and rank 0 reports which ranks have arrived and which have not. When a step has
taken --stall-timeout seconds, the rank that notices aborts the whole job instead of waiting
forever; by default (600 s) only when the step has also taken 100x the recent median, so slow
steps of a big network do not count as stalls. Evaluations and checkpoint writes are timed on their
own against --stall-timeout alone. Nothing is sent unless a step stalls; with both limits 0 no
thread runs.
"""
import collections
import sys
import threading
import time

import numpy as np

TAG_ARRIVED = 7301
ABORT_CODE = 124


class NullWatchdog:
    def begin(self, step, phase="step"):
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
        self.step, self.started, self.in_collective, self.phase = 0, None, False, "step"
        self.recent = collections.deque(maxlen=20)
        self.reported = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mpinn-watchdog", daemon=True)
        self._thread.start()

    # called by the training loop and the engines (cheap attribute writes)
    def begin(self, step, phase="step"):
        """A step (or another phase: "evaluation", "checkpoint write") starts now."""
        self.step, self.phase, self.in_collective = step, phase, False
        self.started = time.perf_counter()

    def arrived(self):
        self.in_collective = True

    def end(self):
        if self.started is not None and self.phase == "step":
            self.recent.append(time.perf_counter() - self.started)
        self.started = None

    def stop(self):
        """End the thread, then free its communicator (a sweep runs many trials in one process:
        each trial's would stay allocated, and MPICH runs out after about 2,000)."""
        self._stop.set()
        self._thread.join(timeout=2)
        if self.side is not None and not self._thread.is_alive():
            self.side.free()
            self.side = None

    # the thread
    def median(self):
        return float(np.median(self.recent)) if self.recent else 0.0

    def threshold(self):
        return max(self.warning, 10 * self.median())

    def timed_out(self, elapsed, phase):
        """A step: past --stall-timeout and 100x the recent median; other phases: the limit."""
        return bool(self.timeout) and elapsed > self.timeout and (
            phase != "step" or elapsed > 100 * self.median())

    def _watch(self):
        period = min(x for x in (self.warning, self.timeout, 1.0) if x > 0) / 4
        while not self._stop.wait(period):
            started, step, phase = self.started, self.step, self.phase
            if started is None:
                continue
            elapsed = time.perf_counter() - started
            if self.timed_out(elapsed, phase):
                what = f"step {step}" if phase == "step" else f"the {phase} after step {step}"
                print(f"mpinn: error on rank {self.comm.rank}: {what} has taken {elapsed:.0f} s, "
                      f"more than --stall-timeout {self.timeout:g} s; aborting the job",
                      file=sys.stderr, flush=True)
                self.comm.abort(ABORT_CODE)
            if (self.warning and phase == "step" and elapsed > self.threshold()
                    and self.reported != step):
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
