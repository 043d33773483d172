"""JAX side of the benchmark suite: the same MLP, one jit-compiled step (forward, softmax
cross-entropy, grad, SGD-momentum update) with donated buffers, float32, synthetic data in memory.
XLA ignores its thread flags, so the process is pinned to --threads cores before JAX starts.
With --ranks 2 (run under mpiexec) the gradient is summed by mpi4jax's allreduce inside the jitted
step, when mpi4jax is installed.

    python benchmarks/jax_bench.py --sizes 784-512-512-10 --batch 128 --threads 1
    mpiexec -n 2 python benchmarks/jax_bench.py --sizes 784-512-512-10 --batch 128 --ranks 2

Prints one JSON object from rank 0: median step time (ms; the slowest rank's median), samples/s
(all ranks).
"""
import argparse
import json
import os
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", required=True)
    p.add_argument("--batch", type=int, required=True, help="rows per rank")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args()
    comm = None
    rank = 0
    if args.ranks > 1:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        rank = comm.Get_rank()
    cores = sorted(os.sched_getaffinity(0))
    first = (rank * args.threads) % len(cores)
    os.sched_setaffinity(0, set(cores[first:first + args.threads]))  # before XLA makes threads
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.flatten_util  # noqa: F401 - ravel_pytree
    import jax.numpy as jnp
    import numpy as np

    sizes = [int(s) for s in args.sizes.split("-")]
    rng = np.random.default_rng(0)
    params = [(jnp.asarray(rng.normal(0, np.sqrt(2 / a), (a, b)), jnp.float32),
               jnp.zeros(b, jnp.float32)) for a, b in zip(sizes[:-1], sizes[1:])]
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
    x = jnp.asarray(rng.normal(size=(args.batch, sizes[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, sizes[-1], args.batch))
    lr, mu, world = 1e-3, 0.9, args.ranks

    def loss(params, x, y):
        h = x
        for W, b in params[:-1]:
            h = jax.nn.relu(h @ W + b)
        W, b = params[-1]
        logits = h @ W + b
        return jnp.mean(jax.nn.logsumexp(logits, axis=1)
                        - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0])

    def reduce(grads):
        if comm is None:
            return grads
        import mpi4jax
        from mpi4py import MPI
        flat, unravel = jax.flatten_util.ravel_pytree(grads)
        total = mpi4jax.allreduce(flat, op=MPI.SUM, comm=comm)
        return unravel(total / world)

    @jax.jit
    def step(params, velocity, x, y):
        grads = reduce(jax.grad(loss)(params, x, y))
        velocity = jax.tree_util.tree_map(lambda v, g: mu * v + g, velocity, grads)
        params = jax.tree_util.tree_map(lambda w, v: w - lr * v, params, velocity)
        return params, velocity

    step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    for _ in range(args.warmup):
        params, velocity = step(params, velocity, x, y)
    jax.block_until_ready(params)
    times = []
    for _ in range(args.steps):
        if comm is not None:
            comm.Barrier()
        t = time.perf_counter()
        params, velocity = step(params, velocity, x, y)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    if comm is not None:
        med = comm.allreduce(med, op=MPI.MAX)
    if rank == 0:
        print(json.dumps({"step_ms": med * 1e3, "samples_per_s": args.batch * world / med,
                          "jax": jax.__version__, "cores": sorted(os.sched_getaffinity(0))}))


if __name__ == "__main__":
    main()
