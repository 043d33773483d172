"""Defects found by the code review and the fault cases of issue 26, one section per item: each test
failed on the code before its fix."""
import os

import h5py
import numpy as np
import pytest

from mpinn.data import RowSource

# --- 1. streaming reads across stored chunk boundaries --------------------------------------------

def _write_chunked(path, x, chunk_rows, reverse):
    """x in chunks of chunk_rows rows, written in file order or last chunk first (the chunks then
    lie in the file in reverse order, with HDF5's B-tree nodes between them past 64 chunks)."""
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("X", shape=x.shape, dtype=x.dtype, chunks=(chunk_rows, x.shape[1]))
        starts = range(0, len(x), chunk_rows)
        for a in (reversed(starts) if reverse else starts):
            ds[a:a + chunk_rows] = x[a:a + chunk_rows]


@pytest.mark.parametrize("reverse", [False, True])
def test_row_source_reads_across_many_chunks(tmp_path, reverse):
    """> 64 chunks: runs of rows must be cut where a stored chunk ends (the next chunk is elsewhere
    in the file)."""
    x = np.random.default_rng(5).normal(size=(150 * 16, 4)).astype(np.float32)
    path = str(tmp_path / "x.h5")
    _write_chunked(path, x, 16, reverse)
    source = RowSource(path, "X")
    assert source.layout is not None  # the direct-read path, not HDF5's
    offsets = source.layout[1]
    assert any(b - a != 16 * 4 * 4 for a, b in zip(offsets, offsets[1:]))  # chunks not back to back
    rng = np.random.default_rng(6)
    try:
        for rows in (np.arange(len(x)), np.arange(10, 2000), rng.permutation(len(x))[:900],
                     np.array([15, 16, 17, 31, 32, 2399, 0])):
            np.testing.assert_array_equal(source.read(rows), x[rows])
    finally:
        source.close()


def test_streamed_training_over_many_chunks_equals_training_from_memory(tmp_path):
    """The issue's case, smaller: data synth's file in 100 chunks; before, streamed weights
    differed from in-memory ones (or a false "contains NaN or inf" ended the run)."""
    from helpers import ok, run_mpinn
    from mpinn import checkpoint
    data = tmp_path / "synth.h5"
    ok(run_mpinn(1, "data", "synth", "--rows", 6400, "--features", 16, "--chunk-rows", 64,
                 "--out", data))
    common = ["--data", data, "--val-data", data, "--epochs", 2, "--hidden", "32"]
    ok(run_mpinn(2, "train", *common, "--run-dir", tmp_path / "memory"))
    r = ok(run_mpinn(2, "train", *common, "--run-dir", tmp_path / "streamed",
                     "--memory-budget", 0.01))
    assert "inputs streamed from" in r.stdout
    a = checkpoint.load(str(tmp_path / "memory" / "checkpoint.h5"))
    b = checkpoint.load(str(tmp_path / "streamed" / "checkpoint.h5"))
    np.testing.assert_array_equal(a.params, b.params)


# --- 2. reads over 2 GiB: preadv returns part of a request ----------------------------------------

def test_row_source_reads_on_after_a_partial_read(tmp_path, monkeypatch):
    """Linux returns at most 2,147,479,552 bytes from one preadv (and any read may come back short):
    a read goes on where the last one stopped. Here every call returns at most 1000 bytes."""
    import mpinn.data.read
    x = np.random.default_rng(7).normal(size=(3000, 9)).astype(np.float32)
    path = str(tmp_path / "x.h5")
    with h5py.File(path, "w") as f:
        f["X"] = x
    real, calls = os.preadv, []

    def capped(fd, buffers, offset):
        (buf,) = buffers
        calls.append(len(memoryview(buf).cast("B")))
        return real(fd, [memoryview(buf).cast("B")[:1000]], offset)
    monkeypatch.setattr(mpinn.data.read.os, "preadv", capped)
    source = RowSource(path, "X")
    try:
        np.testing.assert_array_equal(source.read(np.arange(100, 2900)), x[100:2900])
    finally:
        source.close()
    assert len(calls) > 100  # read in many parts


def test_row_source_says_short_read_at_end_of_file(tmp_path, monkeypatch):
    import mpinn.data.read
    from mpinn.errors import UsageError
    path = str(tmp_path / "x.h5")
    with h5py.File(path, "w") as f:
        f["X"] = np.ones((100, 3), np.float32)
    monkeypatch.setattr(mpinn.data.read.os, "preadv", lambda fd, buffers, offset: 0)
    source = RowSource(path, "X")
    try:
        with pytest.raises(UsageError, match="short read"):
            source.read(np.arange(10))
    finally:
        source.close()


# --- 3. /dev/shm: a window's pages are allocated when it is made ----------------------------------

def in_private_tmpfs(mount, size, command, timeout=180):
    """Run `command` (an argument list) in a private mount namespace with a fresh tmpfs of `size`
    (tmpfs syntax: 64m, 24k) mounted on the folder `mount` (/dev/shm: a container's small one);
    it vanishes with the command. Returns (the process, the names left in `mount` afterwards).
    Skips where no such namespace can be made."""
    import shlex
    import shutil
    import subprocess

    from helpers import ROOT, mpinn_env
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a private mount namespace")
    where = shlex.quote(str(mount))
    script = (f"mount -t tmpfs -o size={size} tmpfs {where} || exit 99\n"
              f"{' '.join(shlex.quote(str(a)) for a in command)}\nrc=$?\n"
              f"echo '--- left:'; ls -A {where}\nexit $rc\n")
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=timeout, env=mpinn_env(), cwd=ROOT,
                       start_new_session=True)
    if p.returncode == 99 or "unshare failed" in p.stderr:
        pytest.skip(f"no private tmpfs here (needs root): {p.stderr.strip()[-200:]}")
    out, _, left = p.stdout.partition("--- left:\n")
    p.stdout = out
    return p, left.split()


def in_private_shm(tmp_path, mib, command, timeout=180):
    return in_private_tmpfs("/dev/shm", f"{mib}m", command, timeout)[0]


THREE_WINDOWS = """
import os
import numpy as np
from mpinn.comm import Comm
comm = Comm()
st = os.statvfs("/dev/shm")
free = comm.allreduce_minmax(st.f_bavail * st.f_frsize)[0]
# each window (2 ranks x 2 slot sets) takes a bit over free/2.5: the free-space check (twice the
# window free) passes for one at a time, and three do not fit
n = int(free / 2.5 / 16)
windows = [comm.node_allreduce(n) for _ in range(3)]
made = [w is not None for w in windows]
for w in windows:
    if w is not None:  # touch every page, as training does
        w.slot[:] = comm.rank + 1
        assert (w.sum_() == 3).all()
        w.slot[:] = 1
        assert (w.sum_() == 2).all()
for w in windows:
    if w is not None:
        w.close()
if comm.rank == 0:
    print("made", made)
"""


def test_windows_that_do_not_fit_fall_back_to_mpi(tmp_path):
    """Three windows made one after the other on one node, each passing the free-space check
    alone: before, none used any room until touched, all three passed, and the first step that
    touched the third one died of SIGBUS. Now the first is allocated at once and the others see
    the room it took: they fall back to MPI's Allreduce, agreed by every rank."""
    import sys

    from helpers import mpiexec
    (tmp_path / "prog.py").write_text(THREE_WINDOWS)
    p = in_private_shm(tmp_path, 64, [mpiexec(), "-n", 2, sys.executable, tmp_path / "prog.py"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "made [True, False, False]"


POPULATE = """
import mmap, os, sys
from mpinn.comm import populate
mib = int(sys.argv[1])
fd = os.open("/dev/shm/window", os.O_RDWR | os.O_CREAT)
os.ftruncate(fd, mib << 20)  # a sparse file: no page allocated yet
m = mmap.mmap(fd, mib << 20)
import ctypes
address = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(populate(address + 100, (mib << 20) - 100))
"""


@pytest.mark.parametrize("mib,fits", [(4, True), (64, False)])
def test_populate_says_when_dev_shm_cannot_back_a_mapping(tmp_path, mib, fits):
    """The call behind it: in a 32 MiB /dev/shm a 4 MiB shared mapping is allocated, a 64 MiB
    one is refused (False), where touching its pages would have been a SIGBUS. (MPICH, started by
    the import, takes ~10 MiB of it: a smaller /dev/shm ends MPI_Init itself.)"""
    import sys
    (tmp_path / "prog.py").write_text(POPULATE)
    p = in_private_shm(tmp_path, 32, [sys.executable, tmp_path / "prog.py", mib])
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == str(fits)


def test_sweep_checks_dev_shm_for_all_its_groups(tmp_path):
    """3 groups x 2 ranks on one node, each group's window (~18 MB, a 1.1 M-parameter network)
    fitting twice in the ~64 MB left free, all three not: the check counts every group on the
    node, so all sum through MPI and every trial trains."""
    from helpers import mpinn_command
    (tmp_path / "grid.toml").write_text("[grid]\nlr = [0.01, 0.02, 0.03]\n")
    out = tmp_path / "s"
    p = in_private_shm(tmp_path, 96, mpinn_command(
        6, "sweep", "--grid", tmp_path / "grid.toml", "--ranks-per-trial", 2, "--out", out,
        "--hidden", "1024,1024", "--steps", 3), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    logs = [(out / f"trial-{i:03d}" / "output.log").read_text() for i in range(3)]
    assert all("shared memory" not in log for log in logs), logs
    assert all("step 3" in log for log in logs), logs


# --- 4. nothing leaks across a sweep's failed trials ---------------------------------------------

FAILING_TRIALS = """import os, sys
from mpi4py import MPI
import mpinn
from mpinn.errors import RunError


def free_contexts():
    # how many more communicators MPICH can make now (each trial's leaked ones lower it)
    made = []
    try:
        while len(made) < 5000:
            made.append(MPI.COMM_WORLD.Dup())
    except MPI.Exception:
        pass
    for c in made:
        c.Free()
    return len(made)


def shm_used():
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


out = sys.argv[1]
kinds = {"diverged": {}, "diverged sharded": {"shard_optimizer": True},
         "diverged pipeline": {"pipeline_stages": 2},
         "bad --timeline": {"timeline": out, "lr": 0.01}}
seen = [("start", free_contexts(), shm_used())]
for round in range(2):
    for i, (kind, extra) in enumerate(kinds.items()):
        opts = {"run_dir": f"{out}/{round}-{i}", "hidden": "256,256", "lr": 1e30, "epochs": 1,
                "progress": "lines", **extra}
        try:
            mpinn.fit(**opts)
            raise SystemExit(f"{kind}: trained")
        except RunError:
            pass
        MPI.COMM_WORLD.Barrier()
        seen.append((kind, free_contexts(), shm_used()))
if MPI.COMM_WORLD.rank == 0:
    for s in seen:
        print(*s, sep="|")
"""


def test_failed_trials_leave_no_window_and_no_communicator(tmp_path):
    """Trials that end in an error every rank agrees on (divergence with the node's shared-memory
    sum, sharded, in a pipeline; a bad --timeline after the engine is built), twice each in one
    process, as a sweep group runs them: afterwards /dev/shm holds what it held after the first
    and MPICH can make as many communicators as before any (a leak of 2-3 a trial ends a group
    after ~700 trials, and of the window ~17 MiB of RAM a trial on a 1.1 M-parameter network)."""
    import sys

    from helpers import mpiexec
    (tmp_path / "prog.py").write_text(FAILING_TRIALS)
    p = in_private_shm(tmp_path, 128, [mpiexec(), "-n", 2, sys.executable, tmp_path / "prog.py",
                                        tmp_path / "runs"], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    seen = [line.split("|") for line in p.stdout.splitlines() if "|" in line]
    assert len(seen) == 9, p.stdout
    contexts = {int(c) for _, c, _ in seen}
    assert contexts == {int(seen[0][1])}, seen
    assert {int(used) for _, _, used in seen[1:]} == {int(seen[1][2])}, seen


# --- 5. a full disk while writing an output -------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from helpers import ok, run_mpinn
    run_dir = tmp_path_factory.mktemp("trained")
    ok(run_mpinn(1, "train", "--run-dir", run_dir, "--epochs", 1))
    return run_dir / "checkpoint.h5"


def full_disk_command(kind, out, trained, tmp_path):
    from helpers import mpinn_command
    if kind == "predict":
        return mpinn_command(2, "predict", "--checkpoint", trained, "--out", out)
    if kind == "predict csv":
        return mpinn_command(1, "predict", "--checkpoint", trained, "--out", out)
    if kind == "synth":
        return mpinn_command(1, "data", "synth", "--rows", 5000, "--features", 16, "--out", out)
    src = tmp_path / "src.csv"
    rng = np.random.default_rng(0)
    src.write_text("a,b,c,label\n" + "".join(f"{a:.6f},{b:.6f},{c:.6f},{int(a > 0)}\n"
                                             for a, b, c in rng.normal(size=(3000, 3))))
    return mpinn_command(1, "data", "convert", src, "--out", out, "--label-column", "label")


@pytest.mark.parametrize("kind,name", [("predict", "p.h5"), ("predict csv", "p.csv"),
                                       ("synth", "s.h5"), ("convert", "c.h5")])
def test_full_disk_while_writing_an_output_is_one_error_and_nothing_installed(
        tmp_path, trained, kind, name):
    """A 16 KiB file system: the output does not fit. Before, h5py swallowed the failed final
    flush, the torn file was renamed into place, "wrote 360 predictions" was printed and the
    process segfaulted at exit (139). Now: one error naming the path, exit 2, no file and no
    temporary left."""
    mount = tmp_path / "full"
    mount.mkdir()
    out = mount / name
    p, left = in_private_tmpfs(mount, "16k", full_disk_command(kind, out, trained, tmp_path))
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    errors = [line for line in p.stderr.splitlines() if line.startswith("mpinn: error")]
    assert len(errors) == 1, p.stderr
    assert f"cannot write --out {out}: No space left on device" in errors[0]
    assert "Traceback" not in p.stderr and "wrote" not in p.stdout
    assert left == [], left


# --- 6. --timeline follows the rules of every output ----------------------------------------------

def test_timeline_never_replaces_an_input_or_a_file_without_overwrite(tmp_path):
    """Before, --timeline opened its path with open(path, "w"): the data file or the run's own
    checkpoint.h5 was replaced by a trace and the run exited 0."""
    import shutil

    from helpers import DIGITS_TRAIN, ok, run_mpinn
    from mpinn import checkpoint
    data = tmp_path / "train.h5"
    shutil.copy(DIGITS_TRAIN, data)
    before = data.read_bytes()
    r = run_mpinn(1, "train", "--data", data, "--epochs", 1, "--run-dir", tmp_path / "a",
                  "--timeline", data)
    assert r.returncode == 2 and f"--timeline {data} is an input of this run" in r.stderr
    assert data.read_bytes() == before
    # the run's own checkpoint, on resume, even with --overwrite on a new run in that folder
    ok(run_mpinn(1, "train", "--data", data, "--epochs", 1, "--run-dir", tmp_path / "b"))
    ckpt = tmp_path / "b" / "checkpoint.h5"
    for extra in (["--resume", "--epochs", 2], ["--overwrite", "--epochs", 1]):
        r = run_mpinn(1, "train", "--data", data, "--run-dir", tmp_path / "b", "--timeline", ckpt,
                      *extra)
        assert r.returncode == 2 and "is a file of the run folder" in r.stderr, r.stderr
        assert checkpoint.load(str(ckpt)).global_step > 0
    # any other existing file: only with --overwrite
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    r = run_mpinn(1, "train", "--data", data, "--epochs", 1, "--run-dir", tmp_path / "c",
                  "--timeline", notes)
    assert r.returncode == 2 and f"--timeline {notes} exists; choose another path or pass " \
                                 "--overwrite" in r.stderr
    assert notes.read_text() == "mine"


def test_a_resumed_run_replaces_its_own_trace(tmp_path):
    """A requeued job gives the same --timeline again: its earlier trace (and only a trace) may
    be replaced without --overwrite."""
    import json

    from helpers import ok, run_mpinn
    trace = tmp_path / "trace.json"
    ok(run_mpinn(2, "train", "--epochs", 1, "--run-dir", tmp_path / "r", "--timeline", trace))
    first = json.loads(trace.read_text())
    ok(run_mpinn(2, "train", "--epochs", 2, "--run-dir", tmp_path / "r", "--timeline", trace,
                 "--resume"))
    second = json.loads(trace.read_text())
    assert second["otherData"]["tool"] == "mpinn" and second != first
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# --- 7. resume reads the run's own data files -----------------------------------------------------

def test_resume_from_another_folder_reads_the_files_the_run_started_on(tmp_path):
    """--data given relative: the checkpoint holds the absolute path, so a resume started in
    another folder (a job script, a requeue) that holds a different file of the same relative
    name still trains on the run's file; a file replaced under the run's own name is refused."""
    import shutil

    from helpers import DIGITS_TRAIN, ok, run_mpinn, write_classification
    from mpinn import checkpoint
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(DIGITS_TRAIN, a / "train.h5")
    write_classification(b / "train.h5", 500, 64, 10, seed=3)  # same name, other rows
    run = tmp_path / "run"
    ok(run_mpinn(2, "train", "--data", "train.h5", "--epochs", 1, "--run-dir", run, cwd=a))
    saved = checkpoint.load(str(run / "checkpoint.h5")).config
    assert saved["data"] == str(a / "train.h5")
    r = ok(run_mpinn(2, "train", "--epochs", 2, "--run-dir", run, "--resume", cwd=b))
    assert "1437 rows" in r.stdout  # the digits, not b's 500 rows
    # the run's file replaced by another of the same name: refused, as another --data is
    shutil.copy(b / "train.h5", a / "train.h5")
    r = run_mpinn(2, "train", "--epochs", 3, "--run-dir", run, "--resume", cwd=b)
    assert r.returncode == 2, r.stderr
    assert f"the run's data file {a / 'train.h5'} has changed since the run started" in r.stderr
    assert "--resume continues a run on its own data" in r.stderr


# --- 8. --overwrite keeps the old run until the new one has a checkpoint --------------------------

def test_overwrite_that_fails_before_its_first_checkpoint_leaves_the_old_run(tmp_path):
    """Before, --overwrite removed the old run's files as the new run started: a new run that
    diverged at step 2 left neither run."""
    import json

    from helpers import ok, run_mpinn
    from mpinn import checkpoint
    run = tmp_path / "run"
    ok(run_mpinn(2, "train", "--run-dir", run, "--epochs", 2, "--seed", 1))
    old = checkpoint.load(str(run / "checkpoint.h5"))
    old_metrics = (run / "metrics.jsonl").read_text()
    r = run_mpinn(2, "train", "--run-dir", run, "--epochs", 2, "--overwrite",
                  env={"MPINN_FAULT": "nan:rank=1:step=2"})
    assert r.returncode == 3, r.stderr  # diverged
    assert "the run it replaced (--overwrite) is back in" in r.stdout
    kept = checkpoint.load(str(run / "checkpoint.h5"))
    np.testing.assert_array_equal(kept.params, old.params)
    assert (run / "metrics.jsonl").read_text() == old_metrics
    assert sorted(p.name for p in run.iterdir()) == [".mpinn-lock", "checkpoint.h5",
                                                      "metrics.jsonl"]
    # killed before its first checkpoint: the next start in the folder puts the old run back
    r = run_mpinn(2, "train", "--run-dir", run, "--epochs", 2, "--overwrite",
                  env={"MPINN_FAULT": "kill:rank=0:step=2"})
    assert r.returncode != 0 and (run / ".mpinn-replaced" / "checkpoint.h5").exists()
    r = ok(run_mpinn(2, "train", "--run-dir", run, "--epochs", 3, "--resume"))
    assert "a run started with --overwrite ended before its first checkpoint; the run it was " \
           "replacing is back in place" in r.stderr
    assert checkpoint.load(str(run / "checkpoint.h5")).global_step > old.global_step
    # an --overwrite that checkpoints replaces the old run for good
    ok(run_mpinn(2, "train", "--run-dir", run, "--epochs", 1, "--overwrite", "--seed", 2))
    assert not (run / ".mpinn-replaced").exists()
    assert [json.loads(l)["kind"] for l in (run / "metrics.jsonl").read_text().splitlines()
            ][-1] == "summary"


# --- 9. a file system without locks is named as such ----------------------------------------------

@pytest.mark.parametrize("code", ["ENOSYS", "ENOLCK"])
def test_a_run_folder_that_cannot_be_locked_says_what_the_file_system_lacks(tmp_path, monkeypatch,
                                                                            code):
    """Only EWOULDBLOCK/EAGAIN mean "in use"; Lustre without -o flock answers ENOSYS, NFS without
    lockd ENOLCK (before, both were "in use by another training (unknown)")."""
    import errno
    import fcntl

    from mpinn.errors import UsageError
    from mpinn.outputs import RunDirLock

    def refuse(fd, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(UsageError) as e:
        RunDirLock(str(tmp_path))
    assert f"cannot lock --run-dir {tmp_path}: flock failed with {code}" in str(e.value)
    assert "does not support file locks" in str(e.value) and "in use" not in str(e.value)


def test_a_run_folder_in_use_is_still_in_use(tmp_path):
    from mpinn.errors import UsageError
    from mpinn.outputs import RunDirLock
    held = RunDirLock(str(tmp_path))
    try:
        with pytest.raises(UsageError, match="is in use by another training \\(pid"):
            RunDirLock(str(tmp_path))
    finally:
        held.release()


def test_doctor_tests_the_lock_in_the_run_folder(tmp_path, monkeypatch):
    import errno
    import fcntl

    from mpinn.hpc.doctor import findings, run_dir_facts
    assert run_dir_facts(str(tmp_path))["lock"] == "ok"
    assert os.listdir(tmp_path) == []  # the probe is gone

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", refuse)
    facts = run_dir_facts(str(tmp_path))
    assert facts["lock"] == "failed: ENOLCK (No locks available)"
    from test_launch import facts as rank_facts
    from test_launch import report
    _, broken = findings(report([rank_facts(0)], run_dir=facts))
    assert len(broken) == 1 and "cannot be locked (flock failed: ENOLCK" in broken[0]


# --- 10. one-class labels are refused -------------------------------------------------------------

ONE_CLASS = [
    (0, [], "holds one class only (every label is 0)"),
    (3, [], "holds one class only (every label is 3)"),
    (0, ["--classes", 1], "1 class: cross_entropy needs at least 2 classes"),
]


@pytest.fixture(scope="module")
def one_class_runs(tmp_path_factory):
    """Every case of ONE_CLASS, in one 2-rank launch (helpers.run_many)."""
    from helpers import run_many
    tmp = tmp_path_factory.mktemp("one-class")
    jobs = {}
    for i, (label, extra, _) in enumerate(ONE_CLASS):
        path = tmp / f"one{i}.h5"
        with h5py.File(path, "w") as f:
            f["X"] = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
            f["y"] = np.full(200, label, np.int64)
        jobs[i] = (2, ["train", "--data", path, "--val-data", path, "--epochs", 1,
                       "--run-dir", tmp / f"r{i}", *extra])
    return run_many(jobs, tmp / "many")


@pytest.mark.parametrize("case", range(len(ONE_CLASS)), ids=[m for _, _, m in ONE_CLASS])
def test_one_class_labels_are_refused(one_class_runs, case):
    """Before, labels that were all 0 trained a 1-output softmax to loss 0 and accuracy 1."""
    r, message = one_class_runs[case], ONE_CLASS[case][2]
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stderr.count("mpinn: error") == 1


# --- 11. a CSV that starts with a UTF-8 byte-order mark -------------------------------------------

@pytest.mark.parametrize("header", [False, True])
def test_csv_with_a_byte_order_mark_keeps_its_first_row_and_names(tmp_path, header):
    """Excel's "CSV UTF-8" starts with a BOM. Before: without a header the first row was taken
    for one and lost; with a header the first name kept the BOM ('\\ufeffkind' is not 'kind')."""
    from helpers import ok, run_mpinn
    rows = [(1, 0.5, 2.0), (0, 1.5, -1.0), (1, 2.5, 0.0), (0, 3.5, 1.0)]
    text = ("kind,a,b\n" if header else "") + "".join(f"{k},{a},{b}\n" for k, a, b in rows)
    src = tmp_path / "bom.csv"
    src.write_bytes(b"\xef\xbb\xbf" + text.encode())
    out = tmp_path / "bom.h5"
    ok(run_mpinn(1, "data", "convert", src, "--out", out, "--label-column",
                 "kind" if header else "0"))
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["X"][:], np.array([r[1:] for r in rows], np.float32))
        np.testing.assert_array_equal(f["y"][:], [r[0] for r in rows])


# --- 12. HDF5 chunks are capped by bytes ----------------------------------------------------------

def test_a_wide_csv_converts_to_a_file_of_its_own_size(tmp_path):
    """Before, data convert always chunked 65,536 rows: HDF5 stores whole chunks, so 50 rows of
    2,000 features made a 524 MB file. Chunks now hold at most 4 MiB."""
    from helpers import ok, run_mpinn
    x = np.random.default_rng(0).normal(size=(50, 2000)).astype(np.float32)
    src = tmp_path / "wide.csv"
    src.write_text("".join(",".join(f"{v:.4f}" for v in row) + f",{i % 2}\n"
                           for i, row in enumerate(x)))
    out = tmp_path / "wide.h5"
    ok(run_mpinn(1, "data", "convert", src, "--out", out))
    assert out.stat().st_size < 6 << 20, out.stat().st_size
    with h5py.File(out) as f:
        rows, width = f["X"].chunks
        assert rows * width * 4 <= 4 << 20 and width == 2000
        np.testing.assert_allclose(f["X"][:], x, atol=1e-4)
    # data synth caps its chunks the same way
    ok(run_mpinn(1, "data", "synth", "--rows", 300, "--features", 4000, "--out", tmp_path / "s.h5"))
    with h5py.File(tmp_path / "s.h5") as f:
        rows, width = f["X"].chunks
        assert rows * width * 4 <= 4 << 20


# --- 13. bad values that ended in a traceback, or too late ----------------------------------------

def test_eps_zero_and_a_config_folder_are_one_clear_error(tmp_path):
    """--eps 0 ended in ZeroDivisionError; --config FOLDER in a traceback from every rank."""
    from helpers import run_mpinn
    r = run_mpinn(2, "train", "--eps", 0, "--run-dir", tmp_path / "r")
    assert r.returncode == 2 and r.stderr.strip() == "mpinn: error: --eps must be positive, got 0.0"
    r = run_mpinn(2, "train", "--config", tmp_path, "--run-dir", tmp_path / "r")
    assert r.returncode == 2
    assert r.stderr.strip() == f"mpinn: error: --config {tmp_path} is a folder; give a TOML file"


def test_a_sweep_with_an_invalid_trial_trains_nothing(tmp_path):
    """Before, lr = -1 in a grid was a failed row after the other trials had trained, and the
    sweep exited 0. Every trial's options are checked before the first starts."""
    from helpers import run_mpinn
    grid = tmp_path / "grid.toml"
    grid.write_text("[grid]\nlr = [0.01, -1.0]\n\n[[trial]]\nbatch_size = 0\n")
    r = run_mpinn(2, "sweep", "--grid", grid, "--out", tmp_path / "s", "--epochs", 1)
    assert r.returncode == 2, r.stderr
    assert (f"{grid}: 2 of 3 trials have invalid options, nothing was trained: trial 001 "
            "(lr=-1.0): --lr must be positive, got -1.0; trial 002 (batch_size=0): --batch-size "
            "must be positive, got 0") in r.stderr
    assert not (tmp_path / "s" / "trial-000").exists()


def test_split_of_a_tiny_file_is_refused(tmp_path):
    """--split 0.8 of 2 rows rounds the test file to no rows: it was a ValueError from h5py."""
    from helpers import run_mpinn
    src = tmp_path / "tiny.csv"
    src.write_text("1,2,0\n3,4,1\n")
    r = run_mpinn(1, "data", "convert", src, "--out", tmp_path / "t.h5", "--split", 0.8)
    assert r.returncode == 2 and "leaves " + str(tmp_path / "t-test.h5") + " with no rows" \
        in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.glob("t-*.h5"))


def test_edited_checkpoint_attributes_are_refused(tmp_path, trained):
    """The checksum covered the arrays only: an edited `sizes` allocated what it said (a
    MemoryError for a large one) or silently changed the network's meaning."""
    import shutil

    from mpinn import checkpoint
    from mpinn.errors import UsageError
    for key, value in (("sizes", np.array([64, 10**6, 10**6, 10], np.int64)),
                       ("activation", "tanh"), ("global_step", 99999)):
        path = tmp_path / f"{key}.h5"
        shutil.copy(trained, path)
        with h5py.File(path, "r+") as f:
            f.attrs[key] = value
        with pytest.raises(UsageError, match="fails its checksum: its attributes"):
            checkpoint.load(str(path))
    # a file without the attribute checksum (older mpinn): sizes are checked against the arrays
    # before anything is allocated
    path = tmp_path / "old.h5"
    shutil.copy(trained, path)
    with h5py.File(path, "r+") as f:
        del f.attrs["attrs_sha256"]
        f.attrs["sizes"] = np.array([64, 10**6, 10**6, 10], np.int64)
    with pytest.raises(UsageError, match="params/W0 is missing or has the wrong shape"):
        checkpoint.load(str(path))


# --- 14. messages that name the file and the real cause -------------------------------------------

def test_a_full_disk_under_the_metrics_names_the_file():
    """errno 28 came out as "OSError: [Errno 28] No space left on device", naming no file."""
    from mpinn.errors import RunError
    from mpinn.log import Log
    log = Log(0, 1)
    log.open_metrics("/dev/full", append=True)  # every write: ENOSPC
    try:
        with pytest.raises(RunError, match="cannot write metrics /dev/full: No space left on "
                                           "device"):
            log.metrics({"kind": "step", "step": 1})
    finally:
        log.close()


@pytest.mark.parametrize("stream", [False, True])
def test_values_beyond_float32_are_not_called_nan_or_inf(tmp_path, stream):
    """1e300 is finite in a float64 file and inf in float32: it was called "NaN or inf"."""
    from helpers import run_mpinn
    x = np.random.default_rng(0).normal(size=(400, 3))
    x[123, 1] = -1e300
    path = tmp_path / "wide.h5"
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = x, np.arange(400) % 2
    clean = tmp_path / "clean.h5"
    with h5py.File(clean, "w") as f:
        f["X"], f["y"] = x[:100], np.arange(100) % 2
    extra = ["--memory-budget", 0.001] if stream else []  # 1 KiB: the 9.6 KB of inputs stream
    r = run_mpinn(1, "train", "--data", path, "--val-data", clean, "--run-dir", tmp_path / "r",
                  *extra)
    assert r.returncode == 2, r.stderr
    assert ("inputs streamed from" in r.stdout) is stream
    assert (f"{path}:X holds values beyond float32's range (largest |value| 1e+300, float32 ends "
            "at 3.4e+38)") in r.stderr
    x[123, 1] = np.nan  # a real NaN is still called one
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = x, np.arange(400) % 2
    r = run_mpinn(1, "train", "--data", path, "--val-data", clean, "--run-dir", tmp_path / "r2",
                  *extra)
    assert r.returncode == 2 and f"{path}:X contains NaN or inf values" in r.stderr


def test_csv_missing_value_markers_and_long_lines(tmp_path):
    """pyarrow reads NA/null/NaN as missing: such a cell was called "empty". A line longer than
    the reader's 1 MiB block was "Empty CSV file or block"; wide files now convert."""
    from helpers import ok, run_mpinn
    src = tmp_path / "na.csv"
    src.write_text("a,b,label\n1,2,0\n3,NA,1\n4,,0\n")
    r = run_mpinn(1, "data", "convert", src, "--out", tmp_path / "na.h5")
    assert r.returncode == 2 and f"{src}: line 3: 'b' holds 'NA', a missing-value marker; " \
                                 "fill or drop the rows" in r.stderr, r.stderr
    src.write_text("a,b,label\n1,2,0\n4,,0\n")
    r = run_mpinn(1, "data", "convert", src, "--out", tmp_path / "na.h5")
    assert r.returncode == 2 and f"{src}: line 3: 'b' is empty" in r.stderr
    x = np.random.default_rng(0).normal(size=(4, 150_000)).astype(np.float32)  # ~1.3 MB a line
    wide = tmp_path / "wide.csv"
    wide.write_text("".join(",".join(f"{v:.5f}" for v in row) + f",{i % 2}\n"
                            for i, row in enumerate(x)))
    ok(run_mpinn(1, "data", "convert", wide, "--out", tmp_path / "wide.h5", timeout=300))
    with h5py.File(tmp_path / "wide.h5") as f:
        np.testing.assert_allclose(f["X"][:], x, atol=1e-5)


# --- 15. a signal while writing an output leaves no hidden temporary ------------------------------

def _wait_for_temporary(folder, name, proc, seconds=60):
    import time
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if [p for p in os.listdir(folder) if p.startswith(f".{name}.tmp-")]:
            return True
        time.sleep(0.05)
    return False


def _temporaries(folder):
    return [p for p in os.listdir(folder) if ".tmp-" in p]


def test_sigterm_and_sigkill_while_writing_leave_no_temporary(tmp_path):
    """SIGTERM ended predict, data convert and data synth at once (Python's default), leaving
    .OUT.tmp-PID; it now ends them as Ctrl-C does: the temporary is removed, exit 143. A SIGKILL
    cannot be caught: the next write of that output removes the dead writer's temporary."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT, finish, mpinn_env, ok, run_mpinn, start_mpinn
    synth = [sys.executable, "-m", "mpinn", "data", "synth", "--rows", 3_000_000, "--features",
             64, "--out", tmp_path / "s.h5"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(list(map(str, synth)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=mpinn_env(), cwd=ROOT)
        assert _wait_for_temporary(tmp_path, "s.h5", proc), proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and "mpinn: error: stopped by SIGTERM" in err, err
            assert _temporaries(tmp_path) == []
        else:
            assert len(_temporaries(tmp_path)) == 1  # the dead writer's
    ok(run_mpinn(1, "data", "synth", "--rows", 100, "--features", 4, "--out", tmp_path / "s.h5"))
    assert _temporaries(tmp_path) == [] and (tmp_path / "s.h5").exists()
    # predict on 2 ranks, SIGTERM to the launcher
    ok(run_mpinn(1, "data", "synth", "--rows", 400_000, "--features", 64, "--out",
                 tmp_path / "d.h5"))
    ok(run_mpinn(1, "train", "--data", tmp_path / "d.h5", "--steps", 1, "--hidden", "2048,2048",
                 "--run-dir", tmp_path / "r"))
    proc = start_mpinn(2, "predict", "--checkpoint", tmp_path / "r" / "checkpoint.h5", "--data",
                       tmp_path / "d.h5", "--out", tmp_path / "p.h5")
    assert _wait_for_temporary(tmp_path, "p.h5", proc), proc.communicate()
    time.sleep(1)  # into the writing: the rows take ~30 s here
    proc.send_signal(signal.SIGTERM)
    r = finish(proc)
    assert r.returncode == 143 and "stopped by SIGTERM" in r.stderr, r.stderr
    assert _temporaries(tmp_path) == [] and not (tmp_path / "p.h5").exists()


# --- 16. metrics after a resume; step checkpoints past 7 digits -----------------------------------

def test_metrics_hold_each_step_once_after_a_resume(tmp_path):
    """A run killed between checkpoints had written the records of steps it redoes on resume:
    they appeared twice in metrics.jsonl. The resume drops the records past its checkpoint."""
    import json

    from helpers import ok, run_mpinn, steps_per_epoch
    spe = steps_per_epoch()
    kill_at = 2 * spe - 3  # epoch 2, after its step records, before its checkpoint
    r = run_mpinn(2, "train", "--run-dir", tmp_path, "--epochs", 3, "--log-every", 5,
                  env={"MPINN_FAULT": f"kill:rank=0:step={kill_at}"})
    assert r.returncode != 0
    before = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(rec["step"] for rec in before) > spe  # records past the epoch-1 checkpoint
    ok(run_mpinn(2, "train", "--run-dir", tmp_path, "--epochs", 3, "--log-every", 5,
                 "--resume"))
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [(rec["kind"], rec["step"]) for rec in records if rec["kind"] != "summary"]
    assert len(train) == len(set(train)), train
    steps = [step for _, step in train]
    assert steps == sorted(steps) and steps[-1] == 3 * spe


def test_step_checkpoints_are_kept_by_step_number_not_name(tmp_path):
    """step-10000000.h5 sorted as text before step-9999996.h5: keeping the last K removed the
    newest, and resume fell back to an older one."""
    from mpinn.checkpoint import step_checkpoints
    for step in (9_999_996, 10_000_000, 9_999_998, 10_000_002):
        (tmp_path / f"step-{step:07d}.h5").write_bytes(b"")
    assert [os.path.basename(p) for p in step_checkpoints(str(tmp_path))] == [
        "step-9999996.h5", "step-9999998.h5", "step-10000000.h5", "step-10000002.h5"]
