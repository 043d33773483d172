"""Test-only fault injection. Does nothing unless MPINN_FAULT is set to
KIND:rank=R[:step=S][:at=WHERE]:

    KIND   raise (RuntimeError) | kill (SIGKILL itself) | hang (sleep for an hour) |
           perturb (parameters drift: the replica check must catch it) |
           nan (a NaN in this rank's inputs of that one step)
    WHERE  step (default: just before optimizer step S) | load (reading the training data) |
           evaluate (validation after an epoch) | checkpoint (rank 0 between writing the
           temporary file and renaming it, at the first checkpoint at or after step S)
e.g. MPINN_FAULT="kill:rank=0:step=30:at=checkpoint"."""
import os
import signal
import sys
import time


class FaultInjector:
    def __init__(self, spec, rank):
        self.kind = None
        if not spec:
            return
        kind, *fields = spec.split(":")
        opts = dict(f.split("=", 1) for f in fields)
        self.kind, self.at_where = kind, opts.get("at", "step")
        self.step, self.active = int(opts.get("step", 0)), int(opts.get("rank", 0)) == rank
        self.fired = False

    @classmethod
    def from_env(cls, rank):
        return cls(os.environ.get("MPINN_FAULT", ""), rank)

    def at(self, where, step=0, engine=None):
        if self.kind is None or not self.active or self.fired or where != self.at_where:
            return
        if (where == "step" and step != self.step) or step < self.step:
            return
        if self.kind == "nan":
            return
        self.fired = True
        # the wall-clock time lets tests measure how long the job takes to end after the fault
        stamp = f"[t={time.time():.3f}]"
        if self.kind == "raise":
            raise RuntimeError(f"injected fault at {where}, step {step} (MPINN_FAULT) {stamp}")
        if self.kind == "kill":
            print(f"mpinn-fault: rank killing itself at {where}, step {step} {stamp}", flush=True,
                  file=sys.stderr)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "hang":
            time.sleep(3600)
        if self.kind == "perturb":
            engine.params[0] += 1e-3

    def batch(self, step, xb):
        """The inputs of a step, with a NaN in them when a nan fault is due (a copy: later steps
        see clean data)."""
        if self.kind != "nan" or not self.active or step != self.step or xb is None or not len(xb):
            return xb
        xb = xb.copy()
        xb[0, 0] = float("nan")
        return xb
