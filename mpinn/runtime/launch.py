"""How this process was launched, from the environment launchers set (pure: takes the environment
as a dict), and the mis-launch check every MPI command runs first.

The classic silent failure: a launcher starts N processes but MPI does not connect them (mpi4py
built against one MPI and started by another's mpiexec; `srun --mpi=pmi2` for an Open MPI 5 that
speaks only PMIx; `srun --mpi=none`), so each process is "rank 0 of 1" and N independent
trainings would write into one run folder. The check fires only when this world has ONE rank
while a launcher says it started more: `mpiexec` inside a SLURM allocation runs Hydra's proxies
in a step with fewer tasks than ranks, but there the world has all its ranks, so it stays quiet.
"""

import os

# (variable, launcher) in the order they are trusted: each holds the number of processes started
LAUNCHER_SIZES = (
    ("SLURM_STEP_NUM_TASKS", "srun"),
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("PMI_SIZE", "a PMI launcher (MPICH/Intel MPI/Cray mpiexec or srun --mpi=pmi2)"),
    ("PMIX_SIZE", "a PMIx launcher"),
    ("MV2_COMM_WORLD_SIZE", "MVAPICH's mpirun_rsh"),
    ("JSM_NAMESPACE_SIZE", "LSF's jsrun"),
)


def launcher_sizes(env):
    """[(variable, launcher, processes it started)] for every launcher variable set."""
    out = []
    for var, who in LAUNCHER_SIZES:
        try:
            out.append((var, who, int(env[var])))
        except (KeyError, ValueError):
            continue
    return out


def mis_launch(world_size, env, library):
    """The one-line explanation when a launcher started several processes but this MPI world
    has one rank; None when the launch is sound."""
    if world_size != 1:
        return None
    started = [(var, who, n) for var, who, n in launcher_sizes(env) if n > 1]
    if not started:
        return None
    var, who, n = started[0]
    hint = ("srun's --mpi plugin does not match this MPI library (Open MPI 5 needs --mpi=pmix, "
            "MPICH --mpi=pmi2; `srun --mpi=list` shows what this Slurm has)"
            if var == "SLURM_STEP_NUM_TASKS" else
            "mpi4py was built against another MPI library than the one whose launcher started it "
            "(use that library's mpiexec, or rebuild mpi4py against the site MPI)")
    return (f"this process is rank 0 of a 1-rank MPI world, but {who} started {n} processes "
            f"({var}={n}): MPI did not connect them, and {n} separate trainings would run. "
            f"Likely cause: {hint}. This MPI is {library}; `mpinn doctor` shows the details")


# the processes between a rank and the person's terminal: MPICH's Hydra (mpiexec, its proxy on
# each node), Open MPI's (mpirun, prterun and its daemon), Slurm's srun
LAUNCHERS = ("mpiexec", "mpiexec.hydra", "mpirun", "hydra_pmi_proxy", "orterun", "prterun",
             "prted", "srun")


def watched_on_a_terminal(stdout_is_tty, proc="/proc", pid=None, depth=4):
    """Whether a person watches this process's output on a terminal: its own stdout is one, or
    (under mpiexec, where a rank writes to a pipe to its launcher) the launcher it runs under
    writes to one. Walks up to `depth` ancestors in /proc: a launcher's stdout that is a
    terminal device (/dev/pts/N, /dev/ttyN) means the rank's lines reach a terminal. False
    where /proc cannot tell (not Linux, another user's launcher, srun's tasks: slurmstepd sits
    between)."""
    if stdout_is_tty:
        return True
    pid = os.getppid() if pid is None else pid
    for _ in range(depth):
        try:
            with open(f"{proc}/{pid}/stat") as fh:
                stat = fh.read()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            parent = int(stat[stat.rindex(")") + 2:].split()[1])
            if name in LAUNCHERS:
                out = os.readlink(f"{proc}/{pid}/fd/1")
                if out.startswith(("/dev/pts/", "/dev/tty")):
                    return True
        except (OSError, ValueError, IndexError):
            return False
        if parent <= 1:
            return False
        pid = parent
    return False
