"""`mpinn scale`: a strong or weak scaling series, or a ranks x threads study, then the report.

    mpinn scale --mode strong --ranks 1,2,4,8 --batch-size 1024 --out scaling/
    mpinn scale --cores 2 --batch-size 1024 --out mix/     # every ranks x threads split of 2 cores
    mpinn scale --mode weak --ranks 1x1,1x2,2x1,2x2 --out two/ \\
        --launcher 'mpiexec -n {n} -ppn {ppn} -hosts node1,node2'   # NxR: N nodes of R ranks

For each run it launches `mpiexec -n k python -m mpinn bench --json` (a subprocess with a
timeout; more ranks than cores are allowed and flagged as oversubscribed), keeps every result in
OUT/raw/bench-*.json, and builds the report from them (report.py). On a cluster, run the bench per
job instead (jobs/slurm/scaling.sbatch) and call `mpinn report` on the results.
"""
import glob
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..config import ReportConfig
from ..errors import UsageError
from ..log import Log
from ..outputs import text_written_whole
from . import report


def default_launcher():
    local = Path(sys.executable).parent / "mpiexec"
    return f"{local if local.exists() else 'mpiexec'} -n {{n}}"


def bench_args(cfg, ranks, threads):
    args = ["--features", cfg.features, "--classes", cfg.classes, "--hidden", cfg.hidden,
            "--steps", cfg.steps, "--warmup", cfg.warmup, "--threads", threads, "--json"]
    if cfg.mode == "strong" or cfg.cores:
        args += ["--batch-size", cfg.batch_size]
    else:
        args += ["--batch-per-rank", cfg.batch_per_rank]
    if ranks > 1:
        args += ["--allreduce-sweep", "--sweep-max", cfg.sweep_max]
    return [str(a) for a in args]


def run_name(ranks, threads, per_node, cfg):
    """The raw result's file name: sorts in series order."""
    if cfg.cores:
        return f"bench-{ranks:05d}x{threads:03d}t.json"
    if per_node:
        return f"bench-{ranks:05d}-{ranks // per_node}x{per_node}.json"
    return f"bench-{ranks:05d}.json"


def run(cfg, explicit, comm=None):
    log = Log()
    series = cfg.series()  # validated with the other options before anything runs
    raw = os.path.join(cfg.out, "raw")
    old = glob.glob(os.path.join(raw, "bench-*.json")) + glob.glob(os.path.join(cfg.out,
                                                                                "report.md"))
    if old and not cfg.overwrite:
        raise UsageError(f"--out {cfg.out} holds a scaling study ({len(old)} file(s)); choose "
                         "another folder or pass --overwrite to replace it")
    for path in old:  # results of an earlier series must not mix into this report
        os.unlink(path)
    os.makedirs(raw, exist_ok=True)
    launcher = cfg.launcher or default_launcher()
    cores = os.cpu_count() or 1
    for k, threads, per_node in series:
        where = f"{k // per_node} node(s) x {per_node}" if per_node else f"{k} rank(s)"
        cmd = shlex.split(launcher.format(n=k, ppn=per_node or k)) + [
            sys.executable, "-m", "mpinn", "bench", *bench_args(cfg, k, threads)]
        note = " (oversubscribed: more ranks than cores)" if k * threads > cores else ""
        log.info(f"mpinn scale: {where} x {threads} thread(s){note}: {' '.join(cmd)}")
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout,
                               env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        except subprocess.TimeoutExpired:
            raise UsageError(f"the {where} run did not finish within --timeout {cfg.timeout} "
                             "s") from None
        except FileNotFoundError:
            raise UsageError(f"cannot run {cmd[0]!r}; set --launcher") from None
        if p.returncode != 0:
            raise UsageError(f"the {where} run failed (exit {p.returncode}): "
                             f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
        with text_written_whole(os.path.join(raw, run_name(k, threads, per_node, cfg))) as fh:
            fh.write(p.stdout.strip().splitlines()[-1] + "\n")
    return report.run(ReportConfig(results=raw, out=cfg.out, mode="auto" if cfg.cores else cfg.mode,
                                   network=cfg.network, title=cfg.title, overwrite=True), explicit)
