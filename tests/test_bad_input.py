"""Bad input, one case per test, each a real 2-rank job (the cases share one launch): the error is one clear line (what, which
file/key/option, what is expected), printed once, exit status 2, no traceback unless --debug, and
nothing is overwritten (an existing run folder is left byte for byte as it was)."""
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import ROOT, ok, run_many, run_mpinn
from mpinn import checkpoint
from mpinn.cli import DRIVERS
from mpinn.outputs import LOCK_NAME

DIGITS = ROOT / "data" / "digits-train.h5"


def h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
    return path


def good_xy(n=40, f=64, k=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, f)).astype(np.float32), rng.integers(0, k, n)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "run"
    ok(run_mpinn(2, "train", "--run-dir", d, "--epochs", 1))
    return d


def make_files(tmp):
    """Every bad file the cases name, written into tmp; returns name -> path."""
    x, y = good_xy()
    files = {"x": str(tmp / "x")}
    files["text"] = tmp / "text.h5"
    files["text"].write_text("this is not HDF5\n")
    files["csv"] = tmp / "table.csv"
    files["csv"].write_text("a,b,y\n1,2,0\n3,4,1\n")
    files["no_x"] = h5(tmp / "no_x.h5", y=y)
    files["no_y"] = h5(tmp / "no_y.h5", X=x)
    files["x_1d"] = h5(tmp / "x_1d.h5", X=x[:, 0], y=y)
    files["y_short"] = h5(tmp / "y_short.h5", X=x, y=y[:-3])
    files["x_strings"] = h5(tmp / "x_strings.h5", X=np.array([[b"a"] * 4] * 40), y=y)
    files["y_float"] = h5(tmp / "y_float.h5", X=x, y=y.astype(np.float64) + 0.5)
    files["y_negative"] = h5(tmp / "y_negative.h5", X=x, y=np.where(y == 3, -1, y))
    files["y_12"] = h5(tmp / "y_12.h5", X=x, y=np.where(y == 3, 12, y))
    x_nan = x.copy()
    x_nan[7, 3] = np.nan
    files["x_nan"] = h5(tmp / "x_nan.h5", X=x_nan, y=y)
    x_inf = x.copy()
    x_inf[33, 0] = np.inf
    files["x_inf"] = h5(tmp / "x_inf.h5", X=x_inf, y=y)
    files["empty"] = h5(tmp / "empty.h5", X=np.zeros((0, 64), np.float32), y=np.zeros(0, int))
    files["one_row"] = h5(tmp / "one_row.h5", X=x[:1], y=y[:1])
    files["f5"] = h5(tmp / "f5.h5", X=x[:, :5], y=y)
    files["targets3"] = h5(tmp / "targets3.h5", X=x, y=np.zeros((40, 3), np.float32))
    files["y_sparse"] = h5(tmp / "y_sparse.h5", X=x, y=np.where(np.arange(40) == 5, 1_000_000,
                                                                  np.arange(40) % 4))
    return files


def make_checkpoints(tmp, good_run):
    src = checkpoint.load(str(good_run / "checkpoint.h5"))
    out = {"good": str(good_run / "checkpoint.h5")}
    newer = tmp / "newer.h5"
    checkpoint.save(str(newer), src)
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = checkpoint.FORMAT_VERSION + 1
    out["newer"] = str(newer)
    corrupt = tmp / "corrupt.h5"
    checkpoint.save(str(corrupt), src)
    with h5py.File(corrupt, "a") as f:
        f["params/W1"][0, 0] += 1.0  # changed behind the checksum's back
    out["corrupt"] = str(corrupt)
    return out


CASES = [
    # (name, argv after the command, expected text)
    ("missing file", ["train", "--data", "{x}/missing.h5"], "data file not found: "),
    ("not HDF5", ["train", "--data", "{text}"], "as HDF5 (Unable to synchronously open file (file signature not found)): mpinn trains on HDF5, Parquet (.parquet) and NumPy (.npz, .npy) files"),
    ("a CSV file", ["train", "--data", "{csv}"], "mpinn trains on HDF5, Parquet (.parquet) and NumPy (.npz, .npy) files; convert this one first: mpinn data convert "),
    ("missing X key", ["train", "--data", "{no_x}"], "no dataset 'X' for inputs (use --x-key"),
    ("missing y key", ["train", "--data", "{no_y}"], "no dataset 'y' for targets (use --y-key"),
    ("X not 2-D", ["train", "--data", "{x_1d}"], ":X must be 2-D (rows x features); it has shape (40,)"),
    ("y length", ["train", "--data", "{y_short}"], ":y must have one entry per row of X (40); it has shape (37,)"),
    ("non-numeric X", ["train", "--data", "{x_strings}"], ":X must be numeric; it has dtype |S1"),
    ("float labels", ["train", "--data", "{y_float}"], ":y must hold integer class labels (1-D) for --loss cross_entropy"),
    ("negative labels", ["train", "--data", "{y_negative}"], ":y has negative class labels (min -1)"),
    ("label >= classes", ["train", "--data", "{y_12}", "--init", "{ckpt_good}"], "class label 12 is out of range for a network with 10 classes"),
    ("NaN in X", ["train", "--data", "{x_nan}"], ":X contains NaN or inf values"),
    ("inf in X", ["train", "--data", "{x_inf}"], ":X contains NaN or inf values"),
    ("empty dataset", ["train", "--data", "{empty}"], ":X is empty (0 rows)"),
    ("fewer rows than ranks", ["train", "--data", "{one_row}"], "has 1 rows, fewer than the 2 ranks"),
    ("batch < ranks", ["train", "--batch-size", "1"], "--batch-size 1 is smaller than the number of ranks (2)"),
    ("val features", ["train", "--data", str(DIGITS), "--val-data", "{f5}"], "has 5 features; "),
    ("init input size", ["train", "--data", "{f5}", "--init", "{ckpt_good}"], "the checkpoint's network takes 64 input features; the data has 5"),
    ("resume architecture", ["train", "--resume", "--hidden", "32"], "--hidden '32' differs from the run's '128,64': --resume continues a run on its own data and options"),
    ("resume on other data", ["train", "--resume", "--data", "{f5}"], "--resume continues a run on its own data and options"),
    ("run dir holds a run", ["train", "--run-dir", "{good_run}"], "holds a run (checkpoint.h5, metrics.jsonl); continue it with --resume, replace it with --overwrite"),
    ("resume and overwrite", ["train", "--resume", "--overwrite"], "--resume continues the run in RUN_DIR and --overwrite replaces it"),
    ("sparse labels", ["train", "--data", "{y_sparse}"], "label 1000000 at row 5 of y would make 1000001 classes, but the labels take only 5 distinct values; pass --classes 1000001"),
    ("labels beyond --classes", ["train", "--data", "{y_12}", "--classes", "5"], "class label 12 is out of range for a network with 5 classes (row"),
    ("network too big for memory", ["train", "--hidden", "200000,200000"], "GiB per rank (parameters, gradients, optimizer state, activations) but this node has"),
    ("predict output exists", ["predict", "--checkpoint", "{ckpt_good}", "--out", "{f5}"], "exists; choose another path or pass --overwrite"),
    ("export output exists", ["export", "--checkpoint", "{ckpt_good}", "--format", "npz", "--out", "{f5}"], "exists; choose another path or pass --overwrite"),
    ("jobs output exists", ["jobs", "slurm", "--out", "{f5}"], "exists; choose another path or pass --overwrite"),
    ("scale needs a series", ["scale", "--ranks", "1"], "a scaling series needs 1 (the baseline) and at least one more rank count"),
    ("newer checkpoint", ["train", "--init", "{ckpt_newer}"], "upgrade mpinn"),
    ("corrupt checkpoint", ["evaluate", "--checkpoint", "{ckpt_corrupt}"], "fails its checksum"),
    ("unknown config key", ["train", "--config", "{toml_unknown}"], "unknown key 'learning_rate'"),
    ("wrong value type", ["train", "--config", "{toml_type}"], "epochs must be int, got str '10'"),
    ("zero lr", ["train", "--lr", "0"], "--lr must be positive, got 0.0"),
    ("negative epochs", ["train", "--epochs", "-2"], "--epochs must be positive, got -2"),
    ("zero batch", ["train", "--batch-size", "0"], "--batch-size must be positive, got 0"),
    ("unknown activation", ["train", "--activation", "mish"], "argument --activation: invalid choice: 'mish'"),
    ("unknown loss", ["train", "--loss", "hinge"], "argument --loss: invalid choice: 'hinge'"),
    ("unknown optimizer", ["train", "--optimizer", "adagrad"], "argument --optimizer: invalid choice: 'adagrad'"),
    ("another optimizer's option", ["train", "--optimizer", "adam", "--trust-coefficient", "0.01"], "--trust-coefficient applies to --optimizer lars; this run uses adam, which does not read it"),
    ("slope without leaky_relu", ["train", "--leaky-slope", "0.2"], "--leaky-slope applies to --activation leaky_relu; this run uses relu"),
    ("momentum with adamw", ["train", "--optimizer", "adamw", "--momentum", "0.5"], "--momentum applies to --optimizer momentum or lars; this run uses adamw"),
    ("run dir is a file", ["train", "--run-dir", "{text}"], "exists and is not a directory"),
    ("resume without checkpoint", ["train", "--run-dir", "{x}/fresh", "--resume"], "--resume: no checkpoint at"),
    ("output in missing folder", ["predict", "--checkpoint", "{ckpt_good}", "--out", "{x}/nowhere/p.h5"], "does not exist"),
    ("mse targets width", ["evaluate", "--checkpoint", "{ckpt_mse}", "--data", "{y_short_mse}"], "targets; the network has"),
    ("timeline folder", ["train", "--timeline", "{x}/nowhere/t.json", "--epochs", "1"], "--timeline"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, good_run):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "x").mkdir()
    files = make_files(tmp)
    files.update({f"ckpt_{k}": v for k, v in make_checkpoints(tmp, good_run).items()})
    files["good_run"] = good_run
    (tmp / "unknown.toml").write_text("learning_rate = 0.1\n")
    (tmp / "type.toml").write_text('epochs = "10"\n')
    files["toml_unknown"], files["toml_type"] = tmp / "unknown.toml", tmp / "type.toml"
    # an mse network with 2 outputs, and data with 3 targets for it
    reg = h5(tmp / "reg.h5", X=good_xy()[0], y=np.zeros((40, 2), np.float32))
    ok(run_mpinn(1, "train", "--data", reg, "--loss", "mse", "--epochs", 1, "--run-dir",
                 tmp / "mse"))
    files["ckpt_mse"] = tmp / "mse" / "checkpoint.h5"
    files["y_short_mse"] = files["targets3"]
    return {k: str(v) for k, v in files.items()}


def snapshot(*folders):
    """Every file below these folders, with its bytes; not the run folder's lock, which each run
    takes (it names the holder) and which holds no data."""
    return {str(p): p.read_bytes() for folder in folders for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


@pytest.fixture(scope="module")
def cases(tmp_path_factory, good_run, inputs):
    """Each case's command line, working folder and watched folders with their bytes before it
    ran; the cases of MPI commands then run, in turn, in one 2-rank launch (tests/many.py: the
    same cli.main, every rank's output), which the one-process commands do not share."""
    root = tmp_path_factory.mktemp("cases")
    prepared, jobs = {}, {}
    for i, (name, argv, _) in enumerate(CASES):
        run_dir, cwd = root / str(i) / "run", root / str(i) / "cwd"
        shutil.copytree(good_run, run_dir)
        cwd.mkdir()
        argv = [a.format(**inputs) for a in argv]
        if argv[0] == "train" and "--run-dir" not in argv:
            argv += ["--run-dir", str(run_dir)]
            if "--resume" not in argv:  # --overwrite removes nothing until every input is checked
                argv.append("--overwrite")
        watched = (run_dir, cwd, Path(inputs["x"]).parent, good_run)
        prepared[name] = (argv, cwd, watched, snapshot(*watched))
        if argv[0] not in DRIVERS:  # commands that run as one process, without MPI, run alone
            jobs[name] = (2, argv, cwd)
    return prepared, run_many(jobs, root / "many", timeout=300)


@pytest.mark.parametrize("name,expected", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_exit_2(cases, name, expected):
    """Nothing is written or changed anywhere a case could write: the run folder it is given (an
    existing run), every input file and checkpoint, and its working folder (empty)."""
    prepared, runs = cases
    argv, cwd, watched, before = prepared[name]
    r = runs[name] if name in runs else run_mpinn(1, *argv, timeout=60, cwd=cwd)
    lines = [l for l in r.stderr.splitlines() if l.startswith("mpinn: error")]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in r.stderr and "Abort" not in r.stderr
    assert snapshot(*watched) == before


def test_debug_adds_the_traceback(tmp_path, inputs):
    r = run_mpinn(2, "train", "--data", inputs["x_nan"], "--run-dir", tmp_path, "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr
    assert "contains NaN or inf values" in r.stderr
