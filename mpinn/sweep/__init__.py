"""Task parallelism: `mpinn sweep` trains many configurations at once in one MPI job (grid.py
what to train, scheduler.py who trains what next, run.py the command, results.py the tables)."""
