"""`mpinn scale`: a strong or weak scaling series on this node, then the report.

    mpinn scale --mode strong --ranks 1,2,4,8 --batch-size 1024 --out scaling/

For each rank count k it launches `mpiexec -n k python -m mpinn bench --json` (a subprocess with a
timeout; more ranks than cores are allowed and flagged as oversubscribed), keeps every result in
OUT/raw/bench-k.json, and builds the report from them (report.py). On a cluster, run the bench per
job instead (jobs/slurm/scaling.sbatch) and call `mpinn report` on the results.
"""
import glob
import os
import shlex
import subprocess
import sys
from pathlib import Path

from . import report
from ..config import ReportConfig, parse_ranks
from ..errors import UsageError
from ..log import Log


def default_launcher():
    local = Path(sys.executable).parent / "mpiexec"
    return f"{local if local.exists() else 'mpiexec'} -n {{n}}"


def bench_args(cfg, ranks):
    args = ["--features", cfg.features, "--classes", cfg.classes, "--hidden", cfg.hidden,
            "--steps", cfg.steps, "--warmup", cfg.warmup, "--threads", cfg.threads, "--json"]
    if cfg.mode == "strong":
        args += ["--batch-size", cfg.batch_size]
    else:
        args += ["--batch-per-rank", cfg.batch_per_rank]
    if ranks > 1:
        args += ["--allreduce-sweep", "--sweep-max", cfg.sweep_max]
    return [str(a) for a in args]


def run(cfg, explicit, comm=None):
    log = Log()
    ranks = parse_ranks(cfg.ranks)  # validated with the other options before anything runs
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
    for k in ranks:
        cmd = shlex.split(launcher.format(n=k)) + [sys.executable, "-m", "mpinn", "bench",
                                                    *bench_args(cfg, k)]
        note = " (oversubscribed: more ranks than cores)" if k * cfg.threads > cores else ""
        log.info(f"mpinn scale: {k} rank(s){note}: {' '.join(cmd)}")
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout,
                               env={**os.environ, "OMP_NUM_THREADS": str(cfg.threads)})
        except subprocess.TimeoutExpired:
            raise UsageError(f"the {k}-rank run did not finish within --timeout {cfg.timeout} s")
        except FileNotFoundError:
            raise UsageError(f"cannot run {cmd[0]!r}; set --launcher") from None
        if p.returncode != 0:
            raise UsageError(f"the {k}-rank run failed (exit {p.returncode}): "
                             f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
        with open(os.path.join(raw, f"bench-{k:05d}.json"), "w") as fh:
            fh.write(p.stdout.strip().splitlines()[-1] + "\n")
    return report.run(ReportConfig(results=raw, out=cfg.out, mode=cfg.mode, network=cfg.network,
                                   title=cfg.title, overwrite=True), explicit)
