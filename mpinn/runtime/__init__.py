"""Safety around the training loop: signals (final checkpoint on SIGTERM/SIGINT), watchdog (stalled
ranks), faults (test-only injection), timeline (Chrome trace of every rank's phases), threads (BLAS
and Numba thread limits)."""
