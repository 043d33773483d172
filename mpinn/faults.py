"""Test-only fault injection. Does nothing unless MPINN_FAULT is set, e.g.
MPINN_FAULT="raise:rank=1:step=3" raises RuntimeError on rank 1 just before optimizer step 3."""
import os


class FaultInjector:
    def __init__(self, spec, rank):
        self.kind, self.rank, self.step = None, None, None
        if not spec:
            return
        kind, *fields = spec.split(":")
        opts = dict(f.split("=", 1) for f in fields)
        self.kind, self.rank, self.step = kind, int(opts.get("rank", 0)), int(opts.get("step", 0))
        self.active = self.rank == rank

    @classmethod
    def from_env(cls, rank):
        return cls(os.environ.get("MPINN_FAULT", ""), rank)

    def at_step(self, step):
        if self.kind == "raise" and self.active and step == self.step:
            raise RuntimeError(f"injected fault at step {step} (MPINN_FAULT)")
