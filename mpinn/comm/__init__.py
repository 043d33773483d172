"""Everything MPI, and the only package that imports mpi4py (comm.mpi):

    collectives  Comm: the communicator every other module is handed (plain collectives)
    agreement    checked / on_root / abort: how ranks end a phase together
    node         NodeAllreduce: the sum through a node's shared memory

Its names load on first use, so `python -m mpinn.comm.mpi` can name the MPI library without
starting MPI.
"""
import importlib

_WHERE = {"Comm": "collectives", "library_version": "mpi", "NodeAllreduce": "node",
          "populate": "node", "shm_free_bytes": "node", "slow_rank_pause": "node"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
