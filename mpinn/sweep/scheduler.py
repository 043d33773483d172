"""Dynamic scheduling of trials: a thread on world rank 0 hands out trial numbers, one at a time,
to whichever group asks, so a group that finishes a short trial takes the next one at once.

Rank 0 also trains in its own group, so the dispatcher is a thread (MPI_THREAD_MULTIPLE) that
polls for requests with short sleeps on its own communicator, never inside the training's
collectives. A group's first rank asks with [the trial it just finished or -1, stop?] and gets
the next trial number, or -1 when there is none left or a stop was asked for.
"""
import sys
import threading
import time
import traceback
from collections import deque

TAG_ASK, TAG_GIVE = 3101, 3102
POLL_S = 0.01


def ask(side, finished, stop):
    """A group's first rank: report the trial it finished (or -1), get the next one (-1: none)."""
    side.send_ints_([finished, int(stop)], 0, TAG_ASK)
    return int(side.recv_ints_idle(1, 0, TAG_GIVE)[0])


class Dispatcher:
    """Hands out `pending` trial numbers to `groups` asking groups until each has been told -1.
    on_start(trial, source rank) and on_end(trial) report progress (rank 0's output)."""

    def __init__(self, side, pending, groups, on_start, on_end):
        self.side, self.pending, self.open = side, deque(pending), groups
        self.on_start, self.on_end = on_start, on_end
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="mpinn-sweep-dispatcher",
                                       daemon=True)

    def start(self):
        self.thread.start()
        return self

    def join(self):
        self.thread.join()

    def _serve(self):
        try:
            while self.open:
                message = self.side.poll_ints_from(2, TAG_ASK)
                if message is None:
                    time.sleep(POLL_S)
                    continue
                source, (finished, stop) = message
                if finished >= 0:
                    self.on_end(int(finished))
                self.stopping |= bool(stop)
                trial = -1 if self.stopping or not self.pending else self.pending.popleft()
                self.open -= trial < 0
                self.side.send_ints_([trial], source, TAG_GIVE)
                if trial >= 0:
                    self.on_start(trial, source)
        except BaseException:  # noqa: B036 - the groups would wait for ever: end the job
            traceback.print_exc()
            print("mpinn: error: the sweep's dispatcher failed (above); ending every rank",
                  file=sys.stderr, flush=True)
            self.side.abort(1)
