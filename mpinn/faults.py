"""Test-only fault injection. Does nothing unless MPINN_FAULT is set:
    MPINN_FAULT="raise:rank=1:step=3"    RuntimeError on rank 1 just before optimizer step 3
    MPINN_FAULT="perturb:rank=1:step=3"  rank 1's parameters drift after step 3 (replica check)"""
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

    def at_step(self, step, engine):
        if self.kind is None or not self.active or step != self.step:
            return
        if self.kind == "raise":
            raise RuntimeError(f"injected fault at step {step} (MPINN_FAULT)")
        if self.kind == "perturb":
            engine.params[0] += 1e-3
