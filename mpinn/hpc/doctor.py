"""`mpinn doctor`: what a job is really running on, checked from inside the job, on any number of
ranks, ending with the warnings a user can act on.

    srun python -m mpinn doctor            (or mpiexec -n 4 python -m mpinn doctor --run-dir runs)

Every rank reports its host, CPU affinity, BLAS and measured sgemm speed, free memory; rank 0 adds
the MPI library, mpi4py, the launcher and PMI it sees, Numba, HDF5 (and whether file locking works
in the run folder), free disk, and a short Allreduce latency/bandwidth sweep. `findings` turns
these facts into warnings (pure: tested on made-up facts). Exit 0 unless something is broken: a
mis-launch (one-rank world under a multi-process launcher) or an unusable run folder.
"""
import json
import os
import shutil
import socket
import tempfile

import numpy as np

from ..errors import AgreedExit
from ..log import Log
from ..outputs import try_lock
from ..runtime.launch import launcher_sizes, mis_launch
from ..runtime.process import available_memory_bytes
from ..runtime.threads import limit_threads
from . import machine
from .bench import allreduce_sweep
from .perfmodel import fit_alpha_beta

GiB = 2 ** 30


def run(cfg, explicit, comm):
    log = Log(comm.rank, comm.size)
    limit_threads(cfg.threads)
    facts = comm.gather_json(rank_facts(comm, cfg.threads))
    sweep = allreduce_sweep(comm, cfg.sweep_max) if comm.size > 1 else []
    if comm.is_root:
        report = {"mpi": comm.build_info(), "launcher": launcher(os.environ),
                  "world_size": comm.size, "threads": cfg.threads, "ranks": facts,
                  "software": software(), "run_dir": run_dir_facts(cfg.run_dir),
                  "allreduce": sweep}
        report["warnings"], report["broken"] = findings(report)
        log.info(json.dumps(report, indent=1) if cfg.json else text(report))
    broken = comm.bcast_int(int(bool(comm.is_root and report["broken"])))
    if broken:
        raise AgreedExit(2)


def rank_facts(comm, threads):
    return {"rank": comm.rank, "host": socket.gethostname(), "node_rank": comm.node_rank(),
            "node_size": comm.node_size(), "cores": os.cpu_count() or 1,
            "affinity": sorted(os.sched_getaffinity(0)), "blas": machine.blas(),
            "sgemm_gflops": round(machine.sgemm_peak(n=512, reps=3), 1),
            "mem_available": available_memory_bytes()}


def launcher(env):
    """Which launcher and PMI this process sees, and how many processes the launcher started."""
    if "OMPI_COMM_WORLD_SIZE" in env:
        name = "Open MPI's mpirun/prterun"
    elif "PMI_FD" in env or "MPI_LOCALNRANKS" in env:
        name = "Hydra's mpiexec (MPICH / Intel MPI)"
    elif "SLURM_STEP_ID" in env and "SLURM_STEP_NUM_TASKS" in env:
        name = "srun"
    else:
        name = "none (a singleton process)"
    pmi = ("PMIx" if "PMIX_NAMESPACE" in env or "PMIX_RANK" in env else
           f"srun --mpi={env['SLURM_MPI_TYPE']}" if "SLURM_MPI_TYPE" in env else
           "Hydra's PMI wire (PMI_FD)" if "PMI_FD" in env else
           "PMI (PMI_SIZE)" if "PMI_SIZE" in env else "none seen")
    scheduler = next((s for s, var in (("SLURM", "SLURM_JOB_ID"), ("PBS", "PBS_JOBID"),
                                       ("Flux", "FLUX_JOB_ID"), ("LSF", "LSB_JOBID"))
                      if var in env), "none")
    return {"name": name, "pmi": pmi, "scheduler": scheduler,
            "started": {var: n for var, _, n in launcher_sizes(env)},
            "mis_launch_env": {var: env[var] for var, _, _ in launcher_sizes(env)}}


def software():
    import h5py
    import numba
    cache = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "__pycache__")
    return {"numba": numba.__version__, "numba_cache": cache,
            "numba_cache_writable": writable_dir(cache), "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version,
            "hdf5_file_locking": os.environ.get("HDF5_USE_FILE_LOCKING", "unset (on)"),
            "blas_override": machine.override_warning(machine.blas())}


def writable_dir(path):
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return bool(path) and os.access(path, os.W_OK)


def run_dir_facts(path):
    """Whether a run folder here would work: writable, HDF5 files with locking, free disk."""
    folder = os.path.abspath(path)
    probe = folder if os.path.isdir(folder) else os.path.dirname(folder)
    facts = {"path": folder, "exists": os.path.isdir(folder), "writable": writable_dir(folder),
             "disk_free": shutil.disk_usage(probe).free if os.path.isdir(probe) else 0,
             "hdf5_write": "not tried", "lock": "not tried"}
    if facts["writable"] and os.path.isdir(probe):
        import h5py
        try:
            with tempfile.NamedTemporaryFile(dir=probe, suffix=".h5") as tmp:
                with h5py.File(tmp.name, "w") as f:
                    f["x"] = np.zeros(4, np.float32)
            facts["hdf5_write"] = "ok"
        except OSError as e:
            facts["hdf5_write"] = f"failed: {e}"
        facts["lock"] = try_lock(probe)
    return facts


def findings(report):
    """(warnings, broken): what to act on, from the gathered facts (pure)."""
    warnings, broken = [], []
    problem = mis_launch(report["world_size"], report["launcher"]["mis_launch_env"],
                         report["mpi"]["library"])
    if problem:
        broken.append(problem)
    rd = report["run_dir"]
    if not rd["writable"]:
        broken.append(f"the run folder {rd['path']} is not writable: checkpoints cannot be saved")
    elif rd["hdf5_write"].startswith("failed"):
        broken.append(f"HDF5 cannot write in {rd['path']} ({rd['hdf5_write']}); on file systems "
                      "without locking set HDF5_USE_FILE_LOCKING=FALSE")
    elif rd["lock"].startswith("failed"):
        broken.append(f"the run folder {rd['path']} cannot be locked (flock {rd['lock']}): "
                      "train refuses it; this file system needs flock that holds across nodes "
                      "(Lustre: mount with -o flock; NFS: lockd)")
    elif rd["disk_free"] < GiB:
        warnings.append(f"only {rd['disk_free'] / GiB:.2f} GiB free at {rd['path']}")
    warnings += node_warnings(report["ranks"], report["threads"])
    fastest = max(r["sgemm_gflops"] for r in report["ranks"])
    for r in report["ranks"]:
        if r["sgemm_gflops"] < 0.6 * fastest:
            warnings.append(f"rank {r['rank']} on {r['host']}: sgemm {r['sgemm_gflops']:.0f} "
                            f"GFLOP/s, {100 * r['sgemm_gflops'] / fastest:.0f}% of the fastest "
                            "rank's: a slower or shared core holds every step back")
    sw = report["software"]
    if sw["blas_override"]:
        warnings.append(sw["blas_override"])
    if not sw["numba_cache_writable"]:
        warnings.append(f"Numba's cache {sw['numba_cache']} is not writable: every run compiles "
                        "its kernels again; set NUMBA_CACHE_DIR to a writable folder")
    if report["world_size"] > 1 and report["mpi"]["thread_level"] != "multiple":
        warnings.append(f"MPI runs at thread level {report['mpi']['thread_level']}: `mpinn "
                        "sweep` and the stall report's ranks list need MPI_THREAD_MULTIPLE")
    return warnings, broken


def node_warnings(ranks, threads):
    """Oversubscription, binding and memory, node by node."""
    out = []
    for host in sorted({r["host"] for r in ranks}):
        here = [r for r in ranks if r["host"] == host]
        cores = here[0]["cores"]
        if len(here) * threads > cores:
            out.append(f"{host}: {len(here)} ranks x {threads} thread(s) exceed its {cores} cores:"
                       " expect slow steps (fine for testing, not for timing)")
        full = [r for r in here if len(r["affinity"]) >= cores]
        if len(here) > 1 and len(full) == len(here):
            out.append(f"{host}: ranks {ranges([r['rank'] for r in here])} are not bound to cores "
                       "(each may run anywhere): bind them for steadier steps (srun "
                       "--cpu-bind=cores, mpiexec -bind-to core, as make train and the job "
                       "files do)")
        bound = [r for r in here if len(r["affinity"]) < cores]
        for i, a in enumerate(bound):
            for b in bound[i + 1:]:
                shared = sorted(set(a["affinity"]) & set(b["affinity"]))
                if shared:
                    out.append(f"{host}: ranks {a['rank']} and {b['rank']} are bound to the same "
                               f"core(s) {ranges(shared)}: they take turns on them")
            if len(a["affinity"]) < threads:
                out.append(f"rank {a['rank']} on {host} is bound to {len(a['affinity'])} core(s) "
                           f"but runs {threads} threads")
        if here[0]["mem_available"] and here[0]["mem_available"] < 2 * GiB:
            out.append(f"{host}: only {here[0]['mem_available'] / GiB:.1f} GiB of memory available")
    return out


def ranges(values):
    """[0, 1, 2, 5] -> '0-2,5'."""
    values, out = sorted(values), []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def text(report):
    mpi, la, sw, rd = report["mpi"], report["launcher"], report["software"], report["run_dir"]
    hosts = sorted({r["host"] for r in report["ranks"]})
    started = ", ".join(f"{k}={v}" for k, v in la["started"].items()) or "nothing set"
    lines = [f"mpinn doctor: {report['world_size']} rank(s) on {len(hosts)} node(s)",
             f"  MPI         {mpi['library']} (MPI {mpi['standard']}), thread level "
             f"{mpi['thread_level']}",
             f"  mpi4py      {mpi['mpi4py']}" + (f", built with {mpi['mpi4py_built_with']}"
                                                 if mpi["mpi4py_built_with"] else ""),
             f"  launcher    {la['name']}; PMI: {la['pmi']}; scheduler {la['scheduler']}; "
             f"launcher's sizes: {started}"]
    for host in hosts:
        here = [r for r in report["ranks"] if r["host"] == host]
        lines.append(f"  node {host}: ranks {ranges([r['rank'] for r in here])} ({len(here)} "
                     f"of {here[0]['cores']} cores, {report['threads']} thread(s) each), "
                     f"{here[0]['mem_available'] / GiB:.1f} GiB memory available")
        for r in here:
            b = r["blas"]
            lines.append(f"    rank {r['rank']}: cores {ranges(r['affinity'])}; {b['library']} "
                         f"{b['version']} kernel {b['architecture'] or '?'}, sgemm "
                         f"{r['sgemm_gflops']:.0f} GFLOP/s")
    lines += [f"  Numba       {sw['numba']}, cache {sw['numba_cache']} "
              f"({'writable' if sw['numba_cache_writable'] else 'NOT writable'})",
              f"  HDF5        {sw['hdf5']} (h5py {sw['h5py']}), file locking "
              f"{sw['hdf5_file_locking']}; a test file in the run folder: {rd['hdf5_write']}",
              f"  run folder  {rd['path']}: {'writable' if rd['writable'] else 'NOT writable'}, "
              f"{rd['disk_free'] / GiB:.1f} GiB free, run-folder lock {rd['lock']}"]
    lines += allreduce_lines(report["allreduce"], report["world_size"])
    for kind, items in (("warning", report["warnings"]), ("BROKEN", report["broken"])):
        lines += [f"  {kind}: {item}" for item in items]
    verdict = ("broken: fix the above before training" if report["broken"] else
               f"{len(report['warnings'])} warning(s), nothing broken")
    return "\n".join(lines + [f"mpinn doctor: {verdict}"])


def allreduce_lines(sweep, ranks):
    if not sweep:
        return ["  Allreduce   not measured (one rank)"]
    points = [(p["bytes"], p["seconds"]) for p in sweep]
    alpha, beta = fit_alpha_beta([(n, ranks, t) for n, t in points])
    sizes = "  ".join(f"{n:,} B {t * 1e6:,.0f} us" for n, t in points[::2])
    return [f"  Allreduce   {sizes}",
            f"              latency {alpha * 1e6:.1f} us, bandwidth {beta / 1e9:.2f} GB/s "
            f"(alpha-beta fit over {ranks} ranks)"]
