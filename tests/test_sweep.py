"""`mpinn sweep` (task parallelism): the grid file's trials, groups of ranks training them through
train's own code (the same weights as `mpiexec -n G mpinn train`), results.csv/md/png, failed
trials recorded while the others go on, a killed rank ending the job, --resume skipping finished
trials and continuing the interrupted one exactly, and the refusals."""
import csv
import itertools
import json
import re
import signal
import time

import numpy as np
import pytest

from helpers import (DIGITS_TRAIN, finish, ok, run_mpinn, start_mpinn, steps_per_epoch,
                     write_classification)
from mpinn import checkpoint
from mpinn.errors import UsageError
from mpinn.sweep.grid import combinations, load_trials, nth_combination
from mpinn.sweep.results import best

SPE = steps_per_epoch(DIGITS_TRAIN)


def grid_file(tmp_path, text):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def results(out):
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def params(path):
    return checkpoint.load(str(path)).params


# --- the grid file -------------------------------------------------------------------------------

def test_grid_is_the_cartesian_product_then_the_explicit_trials(tmp_path):
    path = grid_file(tmp_path, '[grid]\nlr = [0.1, 0.01]\nhidden = ["8", "16,8", ""]\n'
                               '[[trial]]\noptimizer = "sgd"\n[[trial]]\nlr = 0.5\nepochs = 2\n')
    varied, trials = load_trials(path)
    expected = [
        {"lr": a, "hidden": b} for a, b in itertools.product([0.1, 0.01], ["8", "16,8", ""])
    ]
    assert trials == expected + [{"optimizer": "sgd"}, {"lr": 0.5, "epochs": 2}]
    assert varied == ["lr", "hidden", "optimizer", "epochs"]


def test_random_draws_distinct_combinations_of_the_grid_by_seed(tmp_path):
    grid = {"lr": [1, 2, 3, 4], "hidden": ["a", "b", "c"], "seed": [0, 1, 2, 3, 4]}
    product = [dict(zip(grid, c)) for c in itertools.product(*grid.values())]
    drawn = combinations(grid, 7, seed=3)
    assert len(drawn) == 7 and all(d in product for d in drawn)
    assert len({json.dumps(d) for d in drawn}) == 7
    assert combinations(grid, 7, seed=3) == drawn and combinations(grid, 7, seed=4) != drawn
    assert combinations(grid, 60, seed=3) == product  # K >= the grid: every combination once
    lists = list(grid.values())
    assert [nth_combination(lists, i) for i in range(60)] == [
        list(c) for c in itertools.product(*lists)
    ]


@pytest.mark.parametrize("text,message", [
    ("[grid]\nlearning_rate = [0.1]\n", "'learning_rate' is not an `mpinn train` option"),
    ("[grid]\nrun-dir = ['a']\n", "run-dir is set by the sweep for each trial"),
    ("[grid]\nlr = 0.1\n", "[grid] lr must be a non-empty list of values, got 0.1"),
    ("[grid]\nlr = []\n", "[grid] lr must be a non-empty list"),
    ("[grids]\nlr = [1]\n", "unknown table(s) grids"),
    ("", "no trials"),
    ("[grid\n", "is not valid TOML"),
])
def test_bad_grid_files_are_refused_with_the_reason(tmp_path, text, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        load_trials(grid_file(tmp_path, text))


def test_best_is_the_lowest_validation_loss_of_the_trials_that_ended_ok():
    records = [{"status": "ok", "val_loss": 0.5, "train_loss": 0.1},
               {"status": "failed", "val_loss": None, "train_loss": None},
               {"status": "stopped", "val_loss": 0.1, "train_loss": 0.1},
               {"status": "ok", "val_loss": 0.3, "train_loss": 0.9}]
    assert best(records) == (records[3], "val_loss")
    no_val = [{"status": "ok", "val_loss": None, "train_loss": t} for t in (0.4, 0.2)]
    assert best(no_val) == (no_val[1], "train_loss")
    assert best(records[1:3]) == (None, None)


def test_the_sweep_plot_reads_as_its_options_mean(tmp_path):
    """Read back from the figure, not its pixels: lr spanning a decade on a log axis, hidden
    sizes in their numeric order (not "128,64" before "32"), curves labelled by their options."""
    from mpinn.sweep.results import figure
    records = []
    for i, (lr, hidden) in enumerate([(0.01, "128,64"), (0.001, "32"), (0.003, "64,64")]):
        run = tmp_path / f"trial-{i:03d}"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"kind": "epoch", "epoch": e, "val_loss": 1.0 / e + i}) + "\n"
            for e in (1, 2)))
        records.append({"status": "ok", "val_loss": 0.5 + i, "run_dir": str(run),
                        "options": {"lr": lr, "hidden": hidden}})
    fig = figure(records, ["lr", "hidden"])
    lr_axis, hidden_axis, curves = fig.axes
    assert lr_axis.get_xscale() == "log" and lr_axis.get_xlabel() == "lr"
    assert [t.get_text() for t in hidden_axis.get_xticklabels()] == ["32", "64,64", "128,64"]
    assert hidden_axis.lines[0].get_xdata().tolist() == [2, 0, 1]  # each trial at its size
    assert [t.get_text() for t in curves.get_legend().get_texts()] == [
        "lr=0.01, hidden=128,64", "lr=0.001, hidden=32", "lr=0.003, hidden=64,64"]
    assert curves.lines[1].get_ydata().tolist() == [2.0, 1.5]


# --- real sweeps ---------------------------------------------------------------------------------

GRID = """[grid]
lr = [0.003, 0.03]
hidden = ["16", "32,16"]

[[trial]]
optimizer = "sgd"
lr = 1e9

[[trial]]
data = "{missing}"
"""


@pytest.mark.parametrize("ranks,per_trial", [(4, 2), (3, 1)])
def test_sweep_trains_every_trial_as_train_would_and_records_failures(tmp_path, ranks, per_trial):
    out = tmp_path / "s"
    grid = grid_file(tmp_path, GRID.format(missing=tmp_path / "missing.h5"))
    r = ok(run_mpinn(ranks, "sweep", "--grid", grid, "--ranks-per-trial", per_trial, "--out", out,
                     "--epochs", 2, "--seed", 5, timeout=240))
    rows = results(out)
    assert [row["run_dir"] for row in rows] == [str(out / f"trial-{i:03d}") for i in range(6)]
    assert list(rows[0]) == ["run_dir", "lr", "hidden", "optimizer", "data", "val_loss",
                             "val_accuracy", "train_loss", "epochs", "seconds", "status", "reason"]
    assert [row["status"] for row in rows] == ["ok"] * 4 + ["failed"] * 2
    assert re.match(r"non-finite loss or gradient at step \d+ \(epoch 1\)", rows[4]["reason"])
    assert "missing.h5" in rows[5]["reason"] and rows[5]["data"] == str(tmp_path / "missing.h5")
    assert all(row["epochs"] == "2" and float(row["val_accuracy"]) > 0.1 for row in rows[:4])
    # every line comes from world rank 0, each trial's start and end once
    for i in range(6):
        assert r.stdout.count(f"trial {i:03d} started on ") == 1, r.stdout
        assert len(re.findall(rf"^trial {i:03d} (ok|failed) in ", r.stdout, re.M)) == 1
    assert r.stdout.count("mpinn sweep: best ") == 1 and r.stderr.strip() == ""
    top = min(rows[:4], key=lambda row: float(row["val_loss"]))
    assert f"mpinn sweep: best {top['run_dir']}: val_loss {float(top['val_loss']):.4f}" in r.stdout
    assert (out / "results.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "6 trials: 4 ok, 2 failed, 0 stopped" in md and f"Best: `{top['run_dir']}`" in md
    # a trial on G ranks is `mpiexec -n G mpinn train` with its options
    direct = tmp_path / "direct"
    ok(run_mpinn(per_trial, "train", "--lr", 0.03, "--hidden", "32,16", "--epochs", 2, "--seed", 5,
                 "--run-dir", direct))
    np.testing.assert_allclose(params(out / "trial-003" / "checkpoint.h5"),
                               params(direct / "checkpoint.h5"), rtol=0, atol=1e-6)


def test_ranks_not_divisible_and_a_used_out_are_refused(tmp_path):
    grid = grid_file(tmp_path, "[grid]\nlr = [0.01]\n")
    r = run_mpinn(3, "sweep", "--grid", grid, "--ranks-per-trial", 2, "--out", tmp_path / "s")
    assert r.returncode == 2
    assert r.stderr.strip() == ("mpinn: error: --ranks-per-trial 2 does not divide the 3 ranks "
                                "into groups")
    ok(run_mpinn(1, "sweep", "--grid", grid, "--out", tmp_path / "s", "--epochs", 1))
    before = (tmp_path / "s" / "results.csv").read_text()
    r = run_mpinn(1, "sweep", "--grid", grid, "--out", tmp_path / "s", "--epochs", 1)
    assert r.returncode == 2 and "holds a sweep" in r.stderr and "--resume" in r.stderr
    assert (tmp_path / "s" / "results.csv").read_text() == before
    r = run_mpinn(1, "sweep", "--resume", "--out", tmp_path / "s", "--lr", 0.5)
    assert r.returncode == 2 and "--lr cannot change" in r.stderr
    r = run_mpinn(1, "sweep", "--resume", "--out", tmp_path / "nothing")
    assert r.returncode == 2 and "is not a folder of a sweep" in r.stderr
    assert not (tmp_path / "nothing").exists()
    r = ok(run_mpinn(1, "sweep", "--resume", "--out", tmp_path / "s"))
    assert "1 trials, 0 to train" in r.stdout
    bad = grid_file(
        tmp_path, f'[grid]\ndata = ["{tmp_path / "gone-1.h5"}", "{tmp_path / "gone-2.h5"}"]\n'
    )
    r = run_mpinn(2, "sweep", "--grid", bad, "--out", tmp_path / "bad")
    assert r.returncode == 1 and "no trial ended ok" in r.stdout
    assert [row["status"] for row in results(tmp_path / "bad")] == ["failed", "failed"]


def test_a_killed_rank_ends_the_sweep_and_resume_finishes_it_exactly(tmp_path):
    """Two groups of one rank; the long trial's rank is killed after its 4th checkpoint. The
    job ends at once; --resume skips the finished trials (usually all three short ones; a group
    still compiling on a loaded machine may not have finished its first) and continues the long
    one from its checkpoint to the weights of an uninterrupted run."""
    out, long_epochs = tmp_path / "s", 8
    grid = grid_file(tmp_path, f"[grid]\nepochs = [1, 1, 1, {long_epochs}]\n")
    kill_at = 4 * SPE + 3
    r = run_mpinn(2, "sweep", "--grid", grid, "--out", out, "--lr", 0.01,
                  env={"MPINN_FAULT": f"kill:rank=0:step={kill_at}"}, timeout=120)
    assert r.returncode != 0 and r.seconds < 60
    # the trial's own output, the fault's last words included, is in its output.log
    assert f"at step, step {kill_at}" in (out / "trial-003" / "output.log").read_text()
    finished = {i: (out / f"trial-{i:03d}" / "result.json").stat().st_mtime_ns for i in range(3)
                if (out / f"trial-{i:03d}" / "result.json").exists()}
    assert finished  # the other group ran short trials while the long one went on
    assert not (out / "trial-003" / "result.json").exists()
    assert checkpoint.load(str(out / "trial-003" / "checkpoint.h5")).global_step == 4 * SPE
    r = ok(run_mpinn(2, "sweep", "--resume", "--out", out, timeout=120))
    assert f"4 trials, {4 - len(finished)} to train" in r.stdout
    assert "trial 003 started" in r.stdout
    assert {i: (out / f"trial-{i:03d}" / "result.json").stat().st_mtime_ns
            for i in finished} == finished  # finished trials are not run again
    assert [row["status"] for row in results(out)] == ["ok"] * 4
    ok(run_mpinn(1, "train", "--epochs", long_epochs, "--lr", 0.01, "--run-dir", tmp_path / "d"))
    np.testing.assert_array_equal(params(out / "trial-003" / "checkpoint.h5"),
                                  params(tmp_path / "d" / "checkpoint.h5"))


def test_sigterm_stops_every_trial_with_a_checkpoint_and_resume_continues(tmp_path):
    out, epochs = tmp_path / "s", 150
    data = write_classification(tmp_path / "d.h5", 4000, 16, 3)
    grid = grid_file(tmp_path, "[grid]\nlr = [0.01, 0.02, 0.03]\n")
    args = ["--data", data, "--epochs", epochs, "--log-every", 1000]
    proc = start_mpinn(2, "sweep", "--grid", grid, "--out", out, *args)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("trial-00[01]/checkpoint.h5"))) < 2:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to mpiexec, which forwards it to every rank
    r = finish(proc)
    assert r.returncode == 143, r.stderr
    assert "stopped by a signal; continue with `mpinn sweep --resume" in r.stdout
    rows = results(out)
    assert [row["status"] for row in rows] == ["stopped"] * 3, rows
    assert all("stopped by SIGTERM after step" in row["reason"] for row in rows[:2])
    assert rows[2]["reason"] == "not started"
    r = ok(run_mpinn(2, "sweep", "--resume", "--out", out, timeout=120))
    assert "3 trials, 3 to train" in r.stdout
    assert [row["status"] for row in results(out)] == ["ok"] * 3
    ok(run_mpinn(1, "train", *args, "--lr", 0.01, "--run-dir", tmp_path / "d"))
    np.testing.assert_array_equal(params(out / "trial-000" / "checkpoint.h5"),
                                  params(tmp_path / "d" / "checkpoint.h5"))
