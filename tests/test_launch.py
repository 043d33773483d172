"""Launches that cannot silently go wrong: the mis-launch check (a one-rank world under a launcher
that started several processes), and `mpinn doctor`'s facts and findings (on made-up facts, then
for real on 1 and 2 ranks). The SLURM cases (srun --mpi=none, mpiexec inside an allocation, the
requeue) run on the real cluster in test_slurm.py."""
import json
import subprocess
import sys

import pytest

from helpers import ROOT, mpinn_env, ok, run_mpinn
from mpinn.hpc.doctor import findings, launcher, ranges
from mpinn.runtime.launch import mis_launch

LIB = "MPICH Version: 5.0.2"


@pytest.mark.parametrize("env,who", [
    ({"SLURM_STEP_NUM_TASKS": "4"}, "srun started 4 processes (SLURM_STEP_NUM_TASKS=4)"),
    ({"OMPI_COMM_WORLD_SIZE": "3"}, "Open MPI's mpirun started 3 processes"),
    ({"PMI_SIZE": "2"}, "started 2 processes (PMI_SIZE=2)"),
    ({"PMIX_SIZE": "8"}, "a PMIx launcher started 8 processes"),
])
def test_a_one_rank_world_under_a_multi_process_launcher_is_a_mis_launch(env, who):
    message = mis_launch(1, env, LIB)
    assert who in message and "rank 0 of a 1-rank MPI world" in message and LIB in message
    assert ("--mpi=pmix" in message) == ("SLURM_STEP_NUM_TASKS" in env)


@pytest.mark.parametrize("world,env", [
    (1, {}),                                              # no launcher: a singleton is fine
    (1, {"SLURM_STEP_NUM_TASKS": "1", "PMI_SIZE": "1"}),  # srun -n 1 / mpiexec -n 1
    (4, {"SLURM_STEP_NUM_TASKS": "1", "PMI_SIZE": "4"}),  # Hydra's proxies in a 1-task step
    (4, {"SLURM_STEP_NUM_TASKS": "4"}),                   # srun with the right PMI
    (1, {"SLURM_STEP_NUM_TASKS": "many"}),                # unreadable: no guess
])
def test_sound_launches_pass(world, env):
    assert mis_launch(world, env, LIB) is None


def test_every_mpi_command_refuses_a_mis_launch_before_doing_anything(tmp_path):
    env = mpinn_env({"SLURM_STEP_NUM_TASKS": "3"})
    for args in (["train", "--run-dir", tmp_path / "r"], ["evaluate"], ["bench", "--steps", "1"],
                 ["sweep", "--grid", tmp_path / "g.toml", "--out", tmp_path / "s"]):
        p = subprocess.run([sys.executable, "-m", "mpinn", *map(str, args)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "srun started 3 processes" in lines[0], p.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was created
    p = subprocess.run([sys.executable, "-m", "mpinn", "train", "--help"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--run-dir" in p.stdout  # --help still answers


def facts(rank, host="n1", cores=4, affinity=None, gflops=100.0, mem=8 << 30):
    return {"rank": rank, "host": host, "cores": cores, "node_rank": 0, "node_size": 1,
            "affinity": list(range(cores)) if affinity is None else affinity,
            "blas": {"library": "openblas", "version": "0.3", "architecture": "Haswell"},
            "sgemm_gflops": gflops, "mem_available": mem}


def report(ranks, threads=1, world=None, env=None, **changes):
    r = {"world_size": world or len(ranks), "threads": threads, "ranks": ranks,
         "mpi": {"library": LIB, "thread_level": "multiple"},
         "launcher": {"mis_launch_env": env or {}},
         "software": {"blas_override": None, "numba_cache_writable": True, "numba_cache": "/c"},
         "run_dir": {"path": "/runs", "writable": True, "hdf5_write": "ok", "lock": "ok",
                     "disk_free": 1 << 40}}
    for key, value in changes.items():
        r[key] = {**r[key], **value}
    return r


def test_a_sound_job_has_no_findings():
    assert findings(report([facts(0, affinity=[0, 1]), facts(1, affinity=[2, 3])], threads=2)) == (
        [],
        [],
    )


def test_findings_name_what_to_fix():
    warnings, broken = findings(report([facts(0, affinity=[0]), facts(1, affinity=[0]),
                                        facts(2, affinity=[1, 2], gflops=40.0)], threads=2))
    text = "\n".join(warnings)
    assert "n1: 3 ranks x 2 thread(s) exceed its 4 cores" in text
    assert "ranks 0 and 1 are bound to the same core(s) 0" in text
    assert "rank 0 on n1 is bound to 1 core(s) but runs 2 threads" in text
    assert "rank 2 on n1: sgemm 40 GFLOP/s, 40% of the fastest" in text
    assert "ranks 1 and 2" not in text and broken == []
    warnings, _ = findings(report([facts(0), facts(1), facts(2, host="n2")]))
    assert warnings == ["n1: ranks 0-1 are not bound to cores (each may run anywhere): bind them "
                        "for steadier steps (srun --cpu-bind=cores, mpiexec -bind-to core, as "
                        "make train and the job files do)"]
    warnings, _ = findings(report([facts(0, mem=1 << 30)], software={"numba_cache_writable": False},
                                  mpi={"thread_level": "single"}, world=2))
    assert any("1.0 GiB of memory" in w for w in warnings)
    assert any("Numba's cache /c is not writable" in w for w in warnings)
    assert any("thread level single" in w for w in warnings)


def test_broken_launches_and_run_folders():
    _, broken = findings(report([facts(0)], env={"SLURM_STEP_NUM_TASKS": "2"}))
    assert len(broken) == 1 and "srun started 2 processes" in broken[0]
    _, broken = findings(report([facts(0)], run_dir={"writable": False}))
    assert broken == ["the run folder /runs is not writable: checkpoints cannot be saved"]
    _, broken = findings(report([facts(0)], run_dir={"hdf5_write": "failed: unable to lock file"}))
    assert "HDF5_USE_FILE_LOCKING=FALSE" in broken[0]
    warnings, broken = findings(report([facts(0)], run_dir={"disk_free": 1 << 20}))
    assert broken == [] and warnings == ["only 0.00 GiB free at /runs"]


def test_launcher_is_read_from_the_environment():
    hydra = launcher({"PMI_FD": "9", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2"})
    assert hydra["name"].startswith("Hydra") and hydra["started"] == {"PMI_SIZE": 2}
    srun = launcher({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_MPI_TYPE": "pmi2",
                     "SLURM_JOB_ID": "7", "PMI_SIZE": "4"})
    assert (srun["name"], srun["pmi"], srun["scheduler"]) == ("srun", "srun --mpi=pmi2", "SLURM")
    assert launcher({})["name"].startswith("none") and ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_doctor_on_two_ranks_reports_every_rank_once(tmp_path):
    r = ok(run_mpinn(2, "doctor", "--run-dir", tmp_path, "--sweep-max", 65536, "--json"))
    rep = json.loads(r.stdout)
    assert rep["world_size"] == 2 and [x["rank"] for x in rep["ranks"]] == [0, 1]
    assert rep["launcher"]["started"]["PMI_SIZE"] == 2 and rep["broken"] == []
    assert [p["bytes"] for p in rep["allreduce"]] == [4, 16, 64, 256, 1024, 4096, 16384, 65536]
    assert rep["run_dir"]["hdf5_write"] == "ok" and rep["mpi"]["thread_level"] == "multiple"
    assert all(x["sgemm_gflops"] > 0 and x["affinity"] for x in rep["ranks"])
    assert list(tmp_path.iterdir()) == []  # its test file is gone
    r = ok(run_mpinn(2, "doctor", "--run-dir", tmp_path, "--sweep-max", 4096))
    assert r.stdout.count("mpinn doctor: 2 rank(s) on 1 node(s)") == 1
    assert r.stdout.count("    rank ") == 2 and "latency" in r.stdout


def test_doctor_reports_a_mis_launch_as_broken(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mpinn", "doctor", "--run-dir", str(tmp_path)],
                       env=mpinn_env({"SLURM_STEP_NUM_TASKS": "2"}), capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2
    assert "BROKEN: this process is rank 0 of a 1-rank MPI world, but srun started 2" in p.stdout
    assert "Allreduce   not measured (one rank)" in p.stdout


# --- the launcher the job files use ---------------------------------------------------------------

@pytest.mark.parametrize(
    "scheduler,library,plugins,expected",
    [
        (
            "slurm",
            "Open MPI v5.0.3, package: Open MPI",
            ["pmix", "pmi2", "none"],
            "srun --mpi=pmix --cpu-bind=cores -n",
        ),
        (
            "slurm",
            "Open MPI v5.0.3",
            ["pmi2", "none"],  # PMIx only: never pmi2 for Open MPI 5
            "mpiexec --bind-to core --map-by slot:PE=2 -n",
        ),
        ("slurm", "Open MPI v4.1.6", ["pmi2"], "srun --mpi=pmi2 --cpu-bind=cores -n"),
        (
            "slurm",
            "MPICH Version: 5.0.2",
            ["pmix", "none", "cray_shasta", "pmi2"],
            "mpiexec -bind-to core:2 -n",  # not srun: Slurm's pmi2 cuts MPICH's long PMI-1 lines
        ),
        (
            "slurm",
            "MVAPICH Version: 3.0",
            ["pmix", "none", "cray_shasta", "pmi2"],
            "srun --mpi=pmi2 --cpu-bind=cores -n",
        ),
        (
            "slurm",
            "MPI VERSION : CRAY MPICH version 8.1.28",
            ["cray_shasta", "pmi2"],
            "srun --mpi=cray_shasta --cpu-bind=cores -n",
        ),
        ("slurm", "MPICH Version: 4.1", [], "mpiexec -bind-to core:2 -n"),
        ("pbs", "MPICH Version: 4.1", [], "mpiexec -f /pbs/nodes -bind-to core:2 -n"),
        (
            "pbs",
            "Open MPI v5.0.3",
            [],
            "mpiexec --hostfile /pbs/nodes --bind-to core --map-by slot:PE=2 -n",
        ),
    ],
)
def test_the_launcher_follows_the_mpi_library(scheduler, library, plugins, expected):
    from mpinn.hpc.jobs import launch_command

    assert (
        launch_command(scheduler, library, plugins, 2, {"PBS_NODEFILE": "/pbs/nodes"}) == expected
    )


def test_launch_command_names_this_machines_library():
    p = subprocess.run(
        [sys.executable, "-m", "mpinn", "jobs", "pbs", "--launch-command", "--threads", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        env=mpinn_env(),
    )
    assert p.returncode == 0 and p.stdout == "mpiexec -bind-to core:3 -n\n", p.stderr  # MPICH here


# --- --resume auto --------------------------------------------------------------------------------


def test_resume_auto_starts_then_continues_and_refuses_another_configuration(tmp_path):
    run = tmp_path / "r"
    (run).mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train"}\n')  # an attempt that never checkpointed
    r = ok(run_mpinn(2, "train", "--epochs", 1, "--run-dir", run, "--resume", "auto"))
    assert "--resume auto: no checkpoint yet, a new run in" in r.stdout
    assert '{"kind": "train"}' not in (run / "metrics.jsonl").read_text()
    # a job file passes --data '' for the bundled digits: that is the run's own data
    r = ok(run_mpinn(2, "train", "--epochs", 2, "--run-dir", run, "--resume", "auto", "--data", ""))
    assert "--resume auto: continuing the run in" in r.stdout
    straight = tmp_path / "s"
    ok(run_mpinn(2, "train", "--epochs", 2, "--run-dir", straight))
    from mpinn import checkpoint
    a, b = (checkpoint.load(str(p / "checkpoint.h5")) for p in (run, straight))
    assert a.global_step == b.global_step and (a.params == b.params).all()
    r = run_mpinn(2, "train", "--epochs", 3, "--run-dir", run, "--resume", "auto", "--lr", 0.5)
    assert r.returncode == 2 and "--lr 0.5 differs from the run's 0.001" in r.stderr
    r = run_mpinn(1, "train", "--run-dir", run, "--resume", "auto", "--overwrite")
    assert r.returncode == 2 and "give one of them" in r.stderr


def fake_proc(tmp_path, chain):
    """A /proc of processes [(pid, name, parent, stdout)], as watched_on_a_terminal reads it."""
    for pid, name, parent, stdout in chain:
        d = tmp_path / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "stat").write_text(f"{pid} ({name}) S {parent} {pid} {pid} 0 -1\n")
        (d / "fd" / "1").symlink_to(stdout)
    return str(tmp_path)


@pytest.mark.parametrize("chain,watched", [
    # rank 0 <- Hydra's proxy (a pipe) <- mpiexec on the person's terminal
    ([(20, "hydra_pmi_proxy", 10, "pipe:[77]"), (10, "mpiexec.hydra", 5, "/dev/pts/3"),
      (5, "bash", 1, "/dev/pts/3")], True),
    # the same launch from a job script: mpiexec writes to the job's log file
    ([(20, "hydra_pmi_proxy", 10, "pipe:[77]"), (10, "mpiexec.hydra", 5, "/x/job.out"),
      (5, "bash", 1, "/x/job.out")], False),
    # a terminal above, but no launcher between: not this process's output
    ([(20, "python", 5, "pipe:[9]"), (5, "bash", 1, "/dev/pts/3")], False),
    # srun's tasks: slurmstepd between (its stdout is not the person's)
    ([(20, "slurmstepd", 1, "/dev/null")], False),
])
def test_a_terminal_is_seen_through_the_launcher(tmp_path, chain, watched):
    from mpinn.runtime.launch import watched_on_a_terminal
    proc = fake_proc(tmp_path, chain)
    assert watched_on_a_terminal(False, proc, pid=chain[0][0]) is watched
    assert watched_on_a_terminal(True, proc, pid=chain[0][0])  # its own stdout is one
