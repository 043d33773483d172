"""The failure-agreement protocol: a phase that may fail on some ranks only (reading a data
slice, loading a checkpoint on rank 0) runs under `checked`: every rank learns whether any rank
failed, the lowest failing rank prints its message once, and all ranks exit together instead of
leaving the others waiting in a collective. `on_root` is the same for work only rank 0 does;
`abort` ends the job when agreement is impossible."""
import sys
import time
import traceback

import numpy as np

from ..errors import AgreedExit, MpinnError

ABORT_GRACE_S = 0.1


class Agreement:
    """Mixed into Comm: uses its allreduce_minmax, allreduce_, bcast_json and _comm."""

    def abort(self, code, grace_s=None):
        """End every rank with this exit status. The pause first lets the launcher forward the
        message this rank just printed: Abort tears the job down at once, and a message still in
        the launcher's pipe was seen lost (about 1 run in 12 under load)."""
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S if grace_s is None else grace_s)
        self._comm.Abort(code)

    def on_root(self, fn, *args, default=None, **kwargs):
        """fn(*args, **kwargs) on rank 0 (`default` elsewhere), agreed as `checked` agrees: rank
        0's failure is every rank's."""
        return self.checked(lambda: fn(*args, **kwargs) if self.is_root else default)

    def checked(self, fn, *args, **kwargs):
        """Run fn on this rank, then agree with all ranks: if fn raised an MpinnError anywhere,
        the lowest failing rank prints it once and every rank raises AgreedExit with its exit
        status (2 for bad input)."""
        error = None
        try:
            result = fn(*args, **kwargs)
        except MpinnError as e:
            error = e
        # min = the lowest failing rank; max < size only when every rank failed (then the error
        # is the job's, not one rank's, and naming a rank would mislead)
        first, last = self.allreduce_minmax(self.rank if error is not None else self.size)
        if first < self.size:
            code = np.array([error.exit_code if self.rank == first else 0], np.int64)
            where = f" (rank {first} of {self.size})" if last == self.size else ""
            if self.rank == first:
                if self.debug:
                    traceback.print_exception(error, file=sys.stderr)
                print(f"mpinn: error{where}: {error}", file=sys.stderr, flush=True)
            message = self.bcast_json(str(error) if self.rank == first else None, root=first)
            raise AgreedExit(int(self.allreduce_(code, "max")[0]), message + where)
        return result
