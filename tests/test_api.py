"""The Python API: mpinn.fit trains exactly as `mpinn train` does (one process and under mpiexec),
mpinn.load / Model.predict / Model.evaluate agree with `mpinn predict` and `mpinn evaluate`, bad
options fail before MPI starts, and importing mpinn starts no MPI."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from helpers import ROOT, mpiexec, mpinn_env, ok, run_mpinn, write_classification
from mpinn import checkpoint

ARGS = dict(hidden="12,8", epochs=2, batch_size=16, optimizer="momentum", lr=0.05,
            shuffle="none", log_every=100)


def cli_args(options):
    out = []
    for k, v in options.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def script(tmp_path, body):
    path = tmp_path / "script.py"
    path.write_text(body)
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_classification(tmp_path_factory.mktemp("api") / "d.h5", 90, 5, 3, seed=2)


# issue 29's models: a float64 network of another activation and optimizer
AT_SCALE = dict(ARGS, dtype="float64", activation="gelu_tanh", optimizer="lamb", lr=0.01)


@pytest.mark.parametrize("ranks,args", [(1, ARGS), (2, ARGS), (2, AT_SCALE)],
                         ids=["1 rank", "2 ranks", "float64 gelu_tanh lamb"])
def test_fit_trains_as_the_command_line_does(dataset, tmp_path, ranks, args):
    ok(run_mpinn(ranks, "train", "--data", dataset, "--run-dir", tmp_path / "cli",
                 *cli_args(args)))
    # each rank writes its own result: lines printed by two ranks may interleave
    body = (f"import json, mpinn\nr = mpinn.fit(data={dataset!r}, "
            f"run_dir={str(tmp_path / 'api')!r}, **{args!r})\n"
            f"json.dump([r.rank, r.size, r.steps, r.checkpoint], "
            f"open({str(tmp_path)!r} + f'/result-{{r.rank}}.json', 'w'))\n")
    p = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, script(tmp_path, body)],
                       capture_output=True, text=True, timeout=120, env=mpinn_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr
    results = [json.load(open(tmp_path / f"result-{r}.json")) for r in range(ranks)]
    assert [x[:3] for x in results] == [[r, ranks, 12] for r in range(ranks)]
    assert len({x[3] for x in results}) == 1
    cli = checkpoint.load(str(tmp_path / "cli" / "checkpoint.h5"))
    api = checkpoint.load(results[0][3])
    np.testing.assert_array_equal(api.params, cli.params)
    assert api.arch.dtype == api.params.dtype == args.get("dtype", "float32")
    assert api.arch.activation == args.get("activation", "relu")
    import mpinn
    with h5py.File(dataset, "r") as f:
        assert mpinn.load(results[0][3]).predict_proba(f["X"][:5]).dtype == api.params.dtype


def test_fit_takes_the_data_options_as_the_command_line_does(dataset, tmp_path):
    """A validation split, class weights and their metrics through mpinn.fit: the same weights
    as `mpinn train`; mpinn.load(...).evaluate gives the weighted loss `mpinn evaluate` gives."""
    options = dict(ARGS, val_fraction=0.25, class_weight="balanced", scale_inputs="standard",
                   metrics="f1,roc_auc", shuffle="global")
    ok(run_mpinn(2, "train", "--data", dataset, "--run-dir", tmp_path / "cli",
                 *cli_args(options)))
    body = (f"import mpinn\nmpinn.fit(data={dataset!r}, run_dir={str(tmp_path / 'api')!r}, "
            f"**{options!r})\n")
    p = subprocess.run([mpiexec(), "-n", "2", sys.executable, script(tmp_path, body)],
                       capture_output=True, text=True, timeout=120, env=mpinn_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr
    cli = checkpoint.load(str(tmp_path / "cli" / "checkpoint.h5"))
    api = checkpoint.load(str(tmp_path / "api" / "checkpoint.h5"))
    np.testing.assert_array_equal(api.params, cli.params)
    assert api.arch.class_weight == cli.arch.class_weight and len(cli.arch.class_weight) == 3
    import mpinn
    with h5py.File(dataset, "r") as f:
        x, y = f["X"][...], f["y"][...]
    evaluated = json.loads(ok(run_mpinn(1, "evaluate", "--checkpoint", tmp_path / "api" /
                                        "checkpoint.h5", "--data", dataset, "--json")).stdout)
    from mpinn.data import split_rows
    val = split_rows(len(y), 0.25, 0)[1]  # evaluate of the training file: its validation rows
    loss, accuracy = mpinn.load(tmp_path / "api" / "checkpoint.h5").evaluate(x[val], y[val])
    assert evaluated["part"] == "validation" and evaluated["samples"] == len(val)
    assert loss == pytest.approx(evaluated["loss"], rel=1e-6)
    assert accuracy == evaluated["accuracy"]


def test_load_predict_evaluate_agree_with_the_commands(dataset, tmp_path):
    ok(run_mpinn(1, "train", "--data", dataset, "--run-dir", tmp_path, *cli_args(ARGS)))
    ckpt = tmp_path / "checkpoint.h5"
    ok(run_mpinn(1, "predict", "--checkpoint", ckpt, "--data", dataset, "--out",
                 tmp_path / "p.h5"))
    evaluated = json.loads(ok(run_mpinn(1, "evaluate", "--checkpoint", ckpt, "--data", dataset,
                                        "--json")).stdout)
    import mpinn
    model = mpinn.load(ckpt)
    with h5py.File(dataset, "r") as f:
        x, y = f["X"][...], f["y"][...]
    with h5py.File(tmp_path / "p.h5", "r") as f:
        np.testing.assert_allclose(model.predict_proba(x), f["prob"][...], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(model.predict(x), f["pred"][...])  # the classes
    loss, accuracy = model.evaluate(x, y)
    assert accuracy == evaluated["accuracy"]
    assert loss == pytest.approx(evaluated["loss"], rel=1e-6)
    small = mpinn.api.Model(checkpoint.load(str(ckpt)), batch_size=7)  # many chunks, same result
    np.testing.assert_allclose(small.predict_proba(x), model.predict_proba(x), rtol=1e-6)
    with pytest.raises(ValueError, match=r"x must be \(rows, 5\)"):
        model.predict(x[:, :4])


def test_predict_answers_with_the_class_names_the_data_had(dataset, tmp_path):
    with h5py.File(dataset, "r") as f, h5py.File(tmp_path / "named.h5", "w") as g:
        x, y = f["X"][...], f["y"][...]
        g["X"], g["y"] = x, y
        g["y"].attrs["classes"] = np.array(["ash", "elm", "oak"], dtype=h5py.string_dtype())
    ok(run_mpinn(1, "train", "--data", tmp_path / "named.h5", "--run-dir", tmp_path / "r",
                 *cli_args(ARGS)))
    import mpinn
    model = mpinn.load(tmp_path / "r" / "checkpoint.h5")
    assert list(model.classes_) == ["ash", "elm", "oak"]
    names = model.predict(x)
    assert names.shape == (len(x),) and set(names) <= {"ash", "elm", "oak"}
    np.testing.assert_array_equal(names, model.classes_[model.predict_proba(x).argmax(1)])


def test_bad_options_fail_before_mpi_and_import_starts_no_mpi(tmp_path):
    body = (
        "import sys, mpinn\nimport numpy as np\nfrom mpinn.errors import UsageError\n"
        "assert 'mpi4py.MPI' not in sys.modules and 'numba' not in sys.modules\n"
        "for bad in (dict(learning_rate=0.1), dict(epoch=3), dict(epochs='3'), dict(lr=0),\n"
        "            dict(data=(np.zeros((1000, 5)), np.zeros(1000))), dict(zzz=1)):\n"
        "    try:\n        mpinn.fit(**bad)\n    except UsageError as e:\n"
        "        print('refused:', e)\n    else:\n"
        "        raise SystemExit('accepted ' + str(bad))\n"
        "assert 'mpi4py.MPI' not in sys.modules\n"
    )
    p = subprocess.run([sys.executable, script(tmp_path, body)], capture_output=True, text=True,
                       timeout=60, env=mpinn_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    n = len(__import__("mpinn.config").config.TrainConfig.__dataclass_fields__)
    assert p.stdout.splitlines() == [
        "refused: mpinn.fit: unknown option 'learning_rate'; did you mean 'lr'?",
        "refused: mpinn.fit: unknown option 'epoch'; did you mean 'epochs'?",
        "refused: mpinn.fit: epochs must be int, got str '3'",
        "refused: lr must be positive, got 0.0",  # a keyword, not the flag
        "refused: mpinn.fit: data must be str, got tuple (array([[0., 0...ape=(1000, 5)), "
        "array([0., 0...., 0., 0., 0.]))",
        f"refused: mpinn.fit: unknown option 'zzz' (none is close; the {n} options: the "
        "command's --help)"]


def test_fit_is_quiet_and_returns_every_epochs_figures(tmp_path):
    """Nothing on stdout unless verbose=True; the result's history is metrics.jsonl's epoch
    records (with the epoch's training loss) and its metrics the last; an error raised to Python
    names keywords (overwrite=True), not flags."""
    body = (
        "import json, mpinn\n"
        f"r = mpinn.fit(epochs=2, hidden='16', batch_size=128, run_dir={str(tmp_path / 'r')!r})\n"
        "try:\n"
        f"    mpinn.fit(epochs=1, hidden='16', run_dir={str(tmp_path / 'r')!r})\n"
        "except mpinn.errors.RunError as e:\n"
        "    error = str(e)\n"
        "json.dump([r.history, r.metrics, error], open('out.json', 'w'))\n")
    p = subprocess.run([sys.executable, script(tmp_path, body)], capture_output=True, text=True,
                       timeout=120, env=mpinn_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    history, last, error = json.load(open(tmp_path / "out.json"))
    records = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert history == [r for r in records if r["kind"] == "epoch"] and last == history[-1]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["loss"] > 0 and 0 <= h["accuracy"] <= 1 and "val_loss" in h for h in history)
    assert "replace it with overwrite=True" in error and "--" not in error


def test_a_failing_run_raises_run_error(tmp_path):
    body = (f"import mpinn\nfrom mpinn.errors import RunError\ntry:\n"
            f"    mpinn.fit(data={str(tmp_path / 'missing.h5')!r}, run_dir={str(tmp_path)!r})\n"
            f"except RunError as e:\n    print('stopped', e.exit_code)\n")
    p = subprocess.run([sys.executable, script(tmp_path, body)], capture_output=True, text=True,
                       timeout=60, env=mpinn_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "stopped 2" and "data file not found" in p.stderr
