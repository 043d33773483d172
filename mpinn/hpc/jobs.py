"""`mpinn jobs slurm|pbs`: render a ready job file from the templates shipped in mpinn/assets/jobs
with the directives set (nodes, ranks per node, threads per rank, time, partition/queue, account).

    mpinn jobs slurm --kind scaling --nodes 4 --ranks-per-node 32 --time 01:00:00 \\
        --account abc123 --out scaling.sbatch

Only directive lines change; the commented body of the template stays as the guide to the rest.
"""
import os
import re
import shlex
import stat
import subprocess
import sys

from .. import assets
from ..errors import UsageError
from ..log import Log
from ..outputs import check_output_path, written_whole

FILES = {("slurm", "train"): "slurm/train.sbatch", ("slurm", "scaling"): "slurm/scaling.sbatch",
         ("slurm", "sweep"): "slurm/sweep.sbatch", ("pbs", "train"): "pbs/train.pbs",
         ("pbs", "scaling"): "pbs/scaling.pbs", ("pbs", "sweep"): "pbs/sweep.pbs"}
TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$")


def _set(text, pattern, line, required=True):
    """Replace the directive line matching pattern (commented-out or not) by `line`."""
    new, n = re.subn(pattern, line.replace("\\", "\\\\"), text, count=1, flags=re.M)
    if required and n != 1:
        raise UsageError(f"the job template has no line matching {pattern!r}")
    return new


def render_slurm(text, cfg):
    for flag, value in (("nodes", cfg.nodes), ("ntasks-per-node", cfg.ranks_per_node),
                        ("cpus-per-task", cfg.threads), ("time", cfg.time)):
        # keep the template's comment after the value
        text = re.sub(rf"^#SBATCH --{flag}=\S+(\s*)(#.*)?$", f"#SBATCH --{flag}={value}\\1\\2",
                      text, flags=re.M)
    if cfg.partition:
        text = _set(text, r"^##?SBATCH --partition=\S+.*$", f"#SBATCH --partition={cfg.partition}")
    if cfg.account:
        text = _set(text, r"^##?SBATCH --account=\S+.*$", f"#SBATCH --account={cfg.account}")
    if cfg.job_name:
        text = _set(text, r"^#SBATCH --job-name=\S+$", f"#SBATCH --job-name={cfg.job_name}")
    return text


def render_pbs(text, cfg):
    text = _set(text, r"^#PBS -l select=\S+$",
                f"#PBS -l select={cfg.nodes}:ncpus={cfg.ranks_per_node * cfg.threads}"
                f":mpiprocs={cfg.ranks_per_node}:ompthreads={cfg.threads}")
    text = _set(text, r"^#PBS -l walltime=\S+$", f"#PBS -l walltime={cfg.time}")
    if cfg.partition:
        text = _set(text, r"^##?PBS -q \S+.*$", f"#PBS -q {cfg.partition}")
    if cfg.account:
        text = _set(text, r"^##?PBS -A \S+.*$", f"#PBS -A {cfg.account}")
    if cfg.job_name:
        text = _set(text, r"^#PBS -N \S+$", f"#PBS -N {cfg.job_name}")
    return text


def render(cfg):
    if not TIME.match(cfg.time) or (cfg.scheduler == "pbs" and "-" in cfg.time):
        raise UsageError(
            f"--time must be HH:MM:SS{' or D-HH:MM:SS' if cfg.scheduler == 'slurm' else ''}"
            f", got {cfg.time!r}"
        )
    text = assets.path("jobs", FILES[(cfg.scheduler, cfg.kind)]).read_text()
    text = render_slurm(text, cfg) if cfg.scheduler == "slurm" else render_pbs(text, cfg)
    return render_variables(text, cfg)


def render_variables(text, cfg):
    """The job's defaults for the data, options and venv given (its variables still override
    them at submission), and the header's submit line naming this file."""
    if cfg.kind == "scaling" and (cfg.data or cfg.val_data):
        raise UsageError("--data and --val-data are for --kind train or sweep: a scaling job times "
                         "synthetic data (set its network with --args)")
    values = {"DATA": os.path.abspath(cfg.data) if cfg.data else "",
              "VAL_DATA": os.path.abspath(cfg.val_data) if cfg.val_data else "",
              "BENCH_ARGS" if cfg.kind == "scaling" else "ARGS": cfg.args}
    for name, value in values.items():
        if value:
            text = _set(text, rf"^{name}=\$\{{{name}:-(\"[^\"]*\"|[^}}]*)\}}",
                        f"{name}=${{{name}:-{shlex.quote(value)}}}")
    if cfg.venv:
        if not os.path.isfile(os.path.join(cfg.venv, "bin", "activate")):
            raise UsageError(f"--venv {cfg.venv}: no venv there (no bin/activate)")
        text = _set(text, r"^VENV=\$\{VENV-\$PWD/\.venv\}",
                    f"VENV=${{VENV-{shlex.quote(os.path.abspath(cfg.venv))}}}")
    submit = "sbatch" if cfg.scheduler == "slurm" else "qsub"
    return re.sub(rf"{submit} (-v GRID=grid\.toml )?jobs/{cfg.scheduler}/\S+",
                  lambda m: f"{submit} {m.group(1) or ''}{cfg.out or 'THIS_FILE'}", text, count=1)


def launch_command(scheduler, library, srun_plugins, threads, env):
    """The launcher for this MPI library under this scheduler, ending with its rank-count flag
    (pure). Under SLURM: srun with the PMI the library speaks (Open MPI >= 5: PMIx only; Cray
    MPICH and the MPICH derivatives: PMI-2) when this Slurm has that plugin, binding each rank to
    its --cpus-per-task cores; else, and always for MPICH itself, the library's own mpiexec, bound
    to cores the same way (Hydra starts its proxies through srun inside the allocation)."""
    openmpi = re.search(r"Open MPI v?(\d+)", library)
    if scheduler == "slurm":
        for plugin in _srun_plugins_for(library, openmpi):
            if plugin in srun_plugins:
                return f"srun --mpi={plugin} --cpu-bind=cores -n"
    hosts = env.get("PBS_NODEFILE") if scheduler == "pbs" else None
    if openmpi:
        return ("mpiexec" + (f" --hostfile {hosts}" if hosts else "") +
                f" --bind-to core --map-by slot:PE={threads} -n")
    return "mpiexec" + (f" -f {hosts}" if hosts else "") + f" -bind-to core:{threads} -n"


def _srun_plugins_for(library, openmpi):
    """The srun --mpi plugins this library can start under, best first."""
    if openmpi:
        return ["pmix"] if int(openmpi.group(1)) >= 5 else ["pmix", "pmi2"]
    if "CRAY" in library.upper():
        return ["cray_shasta", "pmi2"]
    if library.lstrip().startswith("MPICH Version"):
        # Slurm's pmi2 plugin reads a PMI-1 request with one 1024-byte read(); MPICH >= 4 puts its
        # address in lines of up to ~1080 bytes when the bytes do not compress, and MPI_Init then
        # fails at random ("mpi/pmi2: value not properly terminated"). Hydra reads whole lines.
        return []
    return ["pmi2", "pmix"]


def srun_plugins():
    """The MPI plugins `srun --mpi=list` names (none when there is no srun)."""
    try:
        out = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return re.findall(r"^\s*(?:srun: )?(\w+)\s*$", out.stdout + out.stderr, flags=re.M)


def mpi_library():
    """The MPI library mpi4py loads, named by a child process that does not start MPI."""
    out = subprocess.run([sys.executable, "-m", "mpinn.comm.mpi"], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0:
        raise UsageError(f"cannot load MPI through mpi4py: {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


def run(cfg, explicit, comm=None):
    if cfg.launch_command:
        plugins = srun_plugins() if cfg.scheduler == "slurm" else []
        line = launch_command(cfg.scheduler, mpi_library(), plugins, cfg.threads, os.environ)
        print(line)
        return line
    text = render(cfg)
    if not cfg.out:
        sys.stdout.write(text)
        return text
    check_output_path(cfg.out, overwrite=cfg.overwrite)
    with written_whole(cfg.out) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)
        os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IXUSR | stat.S_IXGRP)
    submit = "sbatch" if cfg.scheduler == "slurm" else "qsub"
    Log().info(f"wrote {cfg.out}: {cfg.nodes} node(s) x {cfg.ranks_per_node} rank(s) x "
               f"{cfg.threads} thread(s), {cfg.time}; submit with `{submit} {cfg.out}`")
    return text
