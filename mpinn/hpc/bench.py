"""`mpinn bench`: time training steps on synthetic in-memory data, phase by phase, on every rank.

    mpiexec -n 4 python -m mpinn bench --features 784 --hidden 512,512 --batch-per-rank 128 --json

Each timed step is split into data (gathering the batch), compute (forward, loss, backward),
allreduce and optimizer. The JSON object reports medians over steps of each phase as max and mean
over ranks (max/mean of compute is the load imbalance), the step time, samples/s, exact training
GFLOP/s, and, with --allreduce-sweep, Allreduce times over message sizes for the alpha-beta model.
"""
import json
import time

import numpy as np

from ..data_parallel import NODE_SHARD_BYTES, DataParallelEngine
from ..errors import UsageError
from ..log import Log
from ..model import Architecture, init_params
from ..plan import even_part
from ..runtime.threads import limit_threads, oversubscription
from . import machine

PHASES = ("data", "compute", "allreduce", "optimizer")
POOL = 4  # distinct synthetic batches a rank cycles through


def training_flops(sizes, rows):
    """Exact multiply-add FLOPs of one training step over `rows` rows: forward, weight gradient
    and input gradient (none for the first layer) of every layer, 2 FLOPs per multiply-add."""
    total = 0
    for l, (fi, fo) in enumerate(zip(sizes[:-1], sizes[1:])):
        total += (4 if l == 0 else 6) * fi * fo * rows
    return total


def allreduce_sweep(comm, max_bytes, shared=False):
    """[(bytes, median seconds)] of a sum over float32 buffers, 4 B to max_bytes: MPI's in-place
    Allreduce, or (shared) the node shared-memory sum the training steps use."""
    out = []
    n_bytes = 4
    while n_bytes <= max_bytes:
        node_sum = (comm.node_allreduce(n_bytes // 4, n_bytes >= NODE_SHARD_BYTES) if shared
                    else None)
        buf = np.ones(n_bytes // 4, np.float32)
        reps = int(max(5, min(200, 4e7 / n_bytes)))
        times = []
        for _ in range(reps):
            comm.barrier()
            t = time.perf_counter()
            node_sum.sum_() if node_sum else comm.allreduce_(buf)
            times.append(time.perf_counter() - t)
        if node_sum:
            node_sum.close()
        worst = comm.allreduce_(np.array([np.median(times)]), "max")[0]
        out.append({"bytes": n_bytes, "seconds": float(worst)})
        n_bytes *= 4
    return out


def run(cfg, explicit, comm):
    rank, size = comm.rank, comm.size
    log = Log(rank, size)
    limit_threads(cfg.threads)
    node_ranks = comm.node_size()
    # "nodes" that share one machine's cores (containers, namespaces) count together
    machine_ranks = max(comm.machine_size(), node_ranks)
    warning = oversubscription(machine_ranks, cfg.threads,
                               where="machine (its nodes share its cores)"
                               if machine_ranks > node_ranks else "node")
    machine_info = machine.blas()
    blas_warning = machine.override_warning(machine_info)
    for text in (warning, blas_warning):
        if text and not cfg.json and comm.is_root:
            log.warn(text)
    sizes = (cfg.features,) + cfg.hidden_sizes() + (cfg.classes,)
    arch = Architecture(sizes, cfg.activation, dtype=cfg.dtype)
    global_batch = cfg.batch_size or cfg.batch_per_rank * size
    if global_batch < size:
        raise UsageError(f"--batch-size {global_batch} is smaller than the {size} ranks")
    rows = even_part(global_batch, size, rank)[1]
    # the engine `mpinn train` uses, so the figures are those of training
    engine = DataParallelEngine(comm, arch, init_params(arch, cfg.seed), rows,
                                dict(name=cfg.optimizer, lr=1e-3), overlap_mb=cfg.overlap_mb,
                                shard=cfg.shard_optimizer, allreduce=cfg.allreduce)
    medians, jit_s = time_steps(cfg, comm, engine, rows, global_batch)
    mean = comm.allreduce_(medians.copy(), "sum") / size
    worst = comm.allreduce_(medians.copy(), "max")
    step_s = float(worst[-2])
    flops = training_flops(sizes, global_batch)
    result = {
        "ranks": size, "ranks_per_node": node_ranks, "nodes": max(size // node_ranks, 1),
        "ranks_per_machine": machine_ranks,
        "threads": cfg.threads, "oversubscribed": warning is not None,
        "layers": list(sizes), "dtype": arch.dtype, "parameters": arch.n_params,
        "global_batch": global_batch,
        "batch_per_rank": global_batch / size, "steps": cfg.steps,
        "step_ms": step_s * 1e3, "samples_per_s": global_batch / step_s,
        "engine_step_ms": float(worst[-1]) * 1e3,
        "phases_ms": {p: {"max": float(worst[j]) * 1e3, "mean": float(mean[j]) * 1e3}
                      for j, p in enumerate(PHASES)},
        "load_imbalance": float(worst[1] / mean[1]) if mean[1] > 0 else 1.0,
        "gflops": flops / step_s / 1e9,
        "compute_s_per_sample": float(mean[1]) / (global_batch / size),
        "gradient_bytes": int(engine.net.grads.nbytes), "overlap_mb": cfg.overlap_mb,
        "shard_optimizer": bool(engine.shard), "node_shared_memory": bool(engine.node_sum),
        "jit_s": jit_s,
        "mpi_library": comm.library_version(),
        "blas": {**machine_info, "sgemm_peak_gflops": machine.sgemm_peak(),
                 "warning": blas_warning or ""},
    }
    if cfg.allreduce_sweep:
        result["allreduce_sweep"] = (allreduce_sweep(comm, cfg.sweep_max, bool(engine.node_sum))
                                     if size > 1 else [])
    engine.close()
    if cfg.json:
        log.info(json.dumps(result))
    else:
        print_result(log, result, arch, warning)
    return result


def time_steps(cfg, comm, engine, rows, global_batch):
    """Median per-phase seconds over the timed steps on this rank: data, compute, allreduce,
    optimizer, the whole step, and the engine's step alone (the batch already in place, as the
    peers in benchmarks/ time theirs); and the kernels' compile or cache-load seconds."""
    rng = np.random.default_rng([cfg.seed, comm.rank])
    dtype = engine.arch.float
    pool_x = rng.normal(size=(POOL * rows, cfg.features)).astype(dtype)
    pool_y = rng.integers(0, cfg.classes, POOL * rows)
    xb = np.empty((rows, cfg.features), dtype)
    yb = np.empty(rows, np.int64)
    t0 = time.perf_counter()
    comm.in_cache_order(lambda: engine.warmup(pool_x, pool_y))
    jit_s = time.perf_counter() - t0
    times = np.zeros((cfg.steps, len(PHASES) + 2))
    scale = 1.0 / global_batch
    for i in range(cfg.warmup + cfg.steps):
        t0 = time.perf_counter()
        idx = np.arange((i % POOL) * rows, (i % POOL + 1) * rows)
        np.take(pool_x, idx, axis=0, out=xb)
        np.take(pool_y, idx, axis=0, out=yb)
        t1 = time.perf_counter()
        engine.step(xb, yb, rows, scale)
        t2 = time.perf_counter()
        if i >= cfg.warmup:
            times[i - cfg.warmup] = (t1 - t0, *engine.phase_s, t2 - t0, t2 - t1)
    return np.median(times, axis=0), jit_s


def print_result(log, result, arch, warning):
    ph, size = result["phases_ms"], result["ranks"]
    b = result["blas"]
    log.info(f"mpinn bench: {size} rank(s) x {result['threads']} thread(s) "
             f"[{result['mpi_library']}; {b['library']} {b['version']} {b['architecture']}, "
             f"sgemm peak {b['sgemm_peak_gflops']:.0f} GFLOP/s], network {arch.describe()}, "
             f"global batch {result['global_batch']}" + (" (oversubscribed)" if warning else ""))
    log.info(f"step {result['step_ms']:.2f} ms, {result['samples_per_s']:,.0f} samples/s, "
             f"{result['gflops']:.1f} GFLOP/s; phases (max/mean ms): "
             + ", ".join(f"{p} {ph[p]['max']:.2f}/{ph[p]['mean']:.2f}" for p in PHASES)
             + f"; load imbalance {result['load_imbalance']:.2f}")
    for point in result.get("allreduce_sweep", []):
        log.info(f"allreduce {point['bytes']:>10,} B: {point['seconds'] * 1e6:10.1f} us")
