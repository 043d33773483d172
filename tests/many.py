"""Several mpinn commands in one MPI launch, for tests that compare many small trainings: every
rank runs the commands in turn through `mpinn.cli.main` (what `python -m mpinn` calls), so the
launch and the imports are paid once. Usage (by helpers.run_many): many.py JOBS.json RESULTS.json,
where JOBS.json is a list of [argument list, working folder or null]; rank 0 writes
[{returncode, stdout, stderr, threads_left}, ...], the output being every rank's, rank 0's first,
as one launch's would be. Commands that end a process (a signal, an abort, a killed rank) do not
belong here; a command that leaves a thread running fails its test."""
import contextlib
import io
import json
import os
import sys
import threading
import time

from mpinn import cli


def main(jobs_path, results_path):
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = []
    home = os.getcwd()
    for argv, cwd in jobs:
        before = set(threading.enumerate())
        out, err = io.StringIO(), io.StringIO()
        os.chdir(cwd or home)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main(argv)
        finally:
            os.chdir(home)
        results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                        "threads_left": threads_left(before)})
    from mpinn.comm.mpi import MPI
    every_rank = MPI.COMM_WORLD.gather(results, root=0)
    if MPI.COMM_WORLD.Get_rank() == 0:
        merged = every_rank[0]  # (a copy of this rank's results, as gather returns it)
        for mine, *others in zip(*every_rank):
            for stream in ("stdout", "stderr"):
                mine[stream] += "".join(other[stream] for other in others)
        with open(results_path, "w") as f:
            json.dump(merged, f)


def threads_left(before, wait_s=5.0):
    """The names of threads a command started and left running (in a process of its own they
    would go unseen at exit): none may outlive the command."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


if __name__ == "__main__":
    main(*sys.argv[1:])
