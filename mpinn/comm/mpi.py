"""The one import of mpi4py (the MPI library is initialised here, on first import).

    python -m mpinn.comm.mpi      names the MPI library without starting MPI
"""
import mpi4py

if __name__ == "__main__":
    mpi4py.rc.initialize = False
from mpi4py import MPI  # noqa: E402

__all__ = ["MPI", "library_version"]


def library_version():
    return " ".join(MPI.Get_library_version().split()[:3])


if __name__ == "__main__":
    print(" ".join(MPI.Get_library_version().strip().splitlines()[0].split()))
