"""mpinn: train dense neural networks (MLPs) data-parallel over MPI ranks.

Modules: cli (commands), config (options), train (the loop), evaluate (evaluate, predict),
kernels (pure Numba forward/backward), model (flat buffers), optim (optimizers), data (which rows a
rank reads), comm (the only MPI user), checkpoint (atomic files), log (rank-0 output)."""
__version__ = "0.1.0"
