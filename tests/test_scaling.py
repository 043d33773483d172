"""--scale-inputs and --scale-targets (data/scaling.py): statistics of the whole training set
merged across ranks (Chan et al.), equal to NumPy's over the whole file at 1 to 4 ranks, streamed
or not, through a pipeline; kept in the checkpoint and applied by evaluate, predict, the Python
API and ONNX/PyTorch/npz export; and `mpinn data stats`."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from helpers import mpiexec, mpinn_env, ok, run_many, run_mpinn
from mpinn import api, checkpoint
from mpinn.data.scaling import Moments, Scale, Scaling, merged, spread_warning
from mpinn.model import Architecture

N, F, K = 203, 6, 2  # 203 rows: no rank count here divides them


def features(n=N, seed=3):
    """Columns of very different scales and offsets, one of them constant."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, F)) * [1e-3, 1.0, 50.0, 4e3, 1.0, 0.0] + [0, 5, -20, 1e4, 0, 7]
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scaling")
    x = features()
    w = np.random.default_rng(4).normal(size=(F, K))
    standard = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
    y_reg = (np.tanh(standard @ w) * [3.0, 200.0] + [10.0, -500.0]).astype(np.float32)
    with h5py.File(tmp / "cls.h5", "w") as f:
        f["X"], f["y"] = x, (standard @ w).argmax(1)
    with h5py.File(tmp / "reg.h5", "w") as f:
        f["X"], f["y"] = x, y_reg
    return {"cls": str(tmp / "cls.h5"), "reg": str(tmp / "reg.h5"), "x": x, "y_reg": y_reg,
            "tmp": tmp}


# -- the statistics, without MPI ------------------------------------------------------------------
@pytest.mark.parametrize("cuts", [[], [1], [50, 51, 120], list(range(1, N, 17))])
def test_merged_moments_are_numpys_over_the_whole_set(cuts):
    x = features().astype(np.float64)
    parts = [Moments.of(p) for p in np.split(x, cuts)]
    m = merged(parts)
    assert m.count == N
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.std, x.std(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(m.low, x.min(0))
    np.testing.assert_array_equal(m.high, x.max(0))
    back = Moments.unpack(m.pack())
    assert back.count == N and np.array_equal(back.m2, m.m2)


def test_scales_of_constant_columns_are_one_and_apply_inverts():
    x = features()
    m = Moments.of(x)
    standard, minmax = Scale.fitted("standard", m), Scale.fitted("minmax", m)
    assert standard.scale[5] == 1.0 and minmax.scale[5] == 1.0  # the constant column
    z = standard.apply_(x.copy())
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, :5].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z[:, :5].std(0), 1, rtol=1e-4)
    np.testing.assert_array_equal(z[:, 5], 0)
    mm = minmax.apply_(x.copy())
    np.testing.assert_allclose(mm[:, :5].min(0), 0, atol=1e-6)
    np.testing.assert_allclose(mm[:, :5].max(0), 1, rtol=1e-5)
    np.testing.assert_allclose(standard.invert_(z), x, rtol=1e-5, atol=1e-3)


def test_spread_warning_only_for_very_different_scales():
    assert "consider --scale-inputs standard" in spread_warning(Moments.of(features()))
    assert spread_warning(Moments.of(np.random.default_rng(0).normal(size=(50, 4)))) is None


def test_checkpoint_keeps_the_scaling_and_its_format_says_so(tmp_path):
    arch = Architecture((F, 3, K), "relu", "identity", "mse")
    m = Moments.of(features())
    scaled = Scaling(Scale.fitted("standard", m), Scale.fitted("standard", Moments.of(
        np.ones((4, K)) * [[1], [2], [3], [5]])))
    for name, scaling, version in (("plain", Scaling(), 1), ("scaled", scaled, 2)):
        ckpt = checkpoint.Checkpoint(arch, np.zeros(arch.n_params, np.float32), scaling=scaling)
        checkpoint.save(str(tmp_path / name), ckpt)
        with h5py.File(tmp_path / name, "r") as f:
            assert f.attrs["format_version"] == version
        got = checkpoint.load(str(tmp_path / name)).scaling
        assert got.to_json() == scaling.to_json()
    with h5py.File(tmp_path / "scaled", "a") as f:  # an edited constant is refused
        s = json.loads(f.attrs["scaling"])
        s["inputs"]["offset"][0] += 1
        f.attrs["scaling"] = json.dumps(s, sort_keys=True)
    with pytest.raises(Exception, match="fails its checksum"):
        checkpoint.load(str(tmp_path / "scaled"))


# -- training across ranks ------------------------------------------------------------------------
COMMON = ["--hidden", "8", "--epochs", 2, "--batch-size", 24, "--log-every", 100]
LAYOUTS = {"1 rank": (1, []), "2 ranks": (2, []), "3 ranks": (3, []), "4 ranks": (4, []),
           "3 ranks streamed": (3, ["--memory-budget", 0.001]),
           "2 stages x 2": (4, ["--pipeline-stages", 2, "--shuffle", "none"])}


@pytest.fixture(scope="module")
def trained(files):
    """layout -> run folder: the classification set with --scale-inputs standard, and the
    regression set with both scalings ("reg", ranks); "raw" trains on the file standardised by
    NumPy with the run's constants, unscaled. Trainings of one rank count share a launch."""
    root = files["tmp"] / "runs"
    jobs = {layout: (ranks, ["train", "--data", files["cls"], *COMMON, "--scale-inputs",
                             "standard", *extra, "--run-dir", root / layout.replace(" ", "-")])
            for layout, (ranks, extra) in LAYOUTS.items()}
    for ranks in (1, 3):
        jobs["reg", ranks] = (ranks, ["train", "--data", files["reg"], "--loss", "mse", *COMMON,
                                      "--scale-inputs", "minmax", "--scale-targets", "standard",
                                      "--run-dir", root / f"reg-{ranks}"])
    runs = run_many(jobs, root)
    return {key: (ok(runs[key]), argv[-1]) for key, (_, argv) in jobs.items()}


def scaling_of(run_dir):
    return checkpoint.load(str(run_dir / "checkpoint.h5")).scaling


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_input_statistics_are_the_whole_files_at_any_layout(files, trained, layout):
    run, run_dir = trained[layout]
    s = scaling_of(run_dir).inputs
    x = files["x"].astype(np.float64)
    assert s.kind == "standard"
    np.testing.assert_allclose(s.offset, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.scale, np.where(x.std(0) > 0, x.std(0), 1), rtol=1e-10)
    assert "inputs scaled (standard) by statistics of the whole training set" in run.stdout
    one = scaling_of(trained["1 rank"][1]).inputs  # the same constants to float64 rounding
    np.testing.assert_allclose(s.offset, one.offset, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(s.scale, one.scale, rtol=1e-14)
    if layout == "3 ranks streamed":
        assert "inputs streamed from" in run.stdout


def test_streamed_chunks_are_scaled_as_rows_in_memory_are(trained):
    """Streamed, each chunk is scaled as it is read: the same network as from memory."""
    a, b = (checkpoint.load(str(trained[layout][1] / "checkpoint.h5")).params
            for layout in ("3 ranks", "3 ranks streamed"))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_scaled_training_is_training_on_the_standardised_file(files, trained, tmp_path):
    """mpinn's scaling, then the same run on the file NumPy standardised with those constants
    and no scaling: the same network, to float32 rounding."""
    s = scaling_of(trained["2 ranks"][1]).inputs
    with h5py.File(tmp_path / "std.h5", "w") as f:
        f["X"] = ((files["x"] - s.offset.astype(np.float32)) / s.scale.astype(np.float32))
        f["y"] = h5py.File(files["cls"], "r")["y"][...]
    ok(run_mpinn(2, "train", "--data", tmp_path / "std.h5", *COMMON, "--run-dir", tmp_path / "r"))
    a = checkpoint.load(str(trained["2 ranks"][1] / "checkpoint.h5")).params
    b = checkpoint.load(str(tmp_path / "r" / "checkpoint.h5")).params
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scaled_regression_predicts_in_the_targets_units(files, trained, tmp_path):
    """evaluate, predict, mpinn.load(...).predict and the three exports all apply the
    checkpoint's scaling: the same outputs, in the targets' own units."""
    run_dir = trained["reg", 3][1]
    ckpt = str(run_dir / "checkpoint.h5")
    scaling = scaling_of(run_dir)
    assert scaling.kinds() == ("minmax", "standard")
    y = files["y_reg"].astype(np.float64)
    np.testing.assert_allclose(scaling.targets.offset, y.mean(0), rtol=1e-12)
    np.testing.assert_allclose(scaling.targets.scale, y.std(0), rtol=1e-10)
    # every layout of the same rows trains on the same constants
    np.testing.assert_allclose(scaling_of(trained["reg", 1][1]).targets.scale,
                               scaling.targets.scale, rtol=1e-14)
    model = api.load(ckpt)
    x_before = files["x"].copy()
    mine = model.predict(files["x"])  # regression: the outputs themselves
    np.testing.assert_array_equal(files["x"], x_before)  # the caller's array is not scaled
    # by hand: scale, forward in float64, unscale
    c = checkpoint.load(ckpt)
    h = (files["x"] - scaling.inputs.offset) / scaling.inputs.scale
    from mpinn.model import layer_views
    layers = list(layer_views(c.arch, c.params))
    for i, (W, b) in enumerate(layers):
        h = h @ W + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(mine, h * scaling.targets.scale + scaling.targets.offset,
                               rtol=1e-4, atol=1e-3 * y.std())
    assert np.abs(mine.mean(0) - y.mean(0)).max() < y.std(0).max()  # in the targets' units
    ok(run_mpinn(2, "predict", "--checkpoint", ckpt, "--data", files["reg"], "--out",
                 tmp_path / "p.h5"))
    with h5py.File(tmp_path / "p.h5", "r") as f:
        np.testing.assert_allclose(f["output"][...], mine, rtol=1e-5, atol=1e-4)
    ok(run_mpinn(2, "predict", "--checkpoint", ckpt, "--data", files["reg"], "--out",
                 tmp_path / "pipelined.h5", "--pipeline-stages", 2))  # the other predict path
    with h5py.File(tmp_path / "pipelined.h5", "r") as f:
        np.testing.assert_allclose(f["output"][...], mine, rtol=1e-5, atol=1e-4)
    result = json.loads(ok(run_mpinn(3, "evaluate", "--checkpoint", ckpt, "--data",
                                     files["reg"], "--json")).stdout)
    loss, _ = model.evaluate(files["x"], files["y_reg"])
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    for fmt in ("onnx", "torch", "npz"):
        ok(run_mpinn(1, "export", "--checkpoint", ckpt, "--format", fmt, "--out",
                     tmp_path / f"m.{fmt}"))
    import onnxruntime as ort
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": files["x"]})[0], mine, rtol=1e-4,
                               atol=1e-3)
    import torch
    net = torch.nn.Sequential(torch.nn.Linear(F, 8), torch.nn.ReLU(), torch.nn.Linear(8, K))
    net.load_state_dict(torch.load(tmp_path / "m.torch"))
    with torch.no_grad():
        folded = net(torch.as_tensor(files["x"])).numpy()
    np.testing.assert_allclose(folded, mine, rtol=1e-4, atol=1e-3 * y.std())
    with np.load(tmp_path / "m.npz") as npz:
        np.testing.assert_array_equal(npz["input_scale"], scaling.inputs.scale)
        np.testing.assert_array_equal(npz["target_offset"], scaling.targets.offset)


def test_fit_scales_as_the_command_line_does(files, trained, tmp_path):
    (tmp_path / "fit.py").write_text(
        "import mpinn\n"
        f"mpinn.fit(data={files['reg']!r}, loss='mse', hidden='8', epochs=2, batch_size=24, "
        f"log_every=100, scale_inputs='minmax', scale_targets='standard', "
        f"run_dir={str(tmp_path / 'api')!r})\n")
    p = subprocess.run([mpiexec(), "-n", "1", sys.executable, str(tmp_path / "fit.py")],
                       capture_output=True, text=True, timeout=120, env=mpinn_env())
    assert p.returncode == 0, p.stderr
    api_run = checkpoint.load(str(tmp_path / "api" / "checkpoint.h5"))
    cli_run = checkpoint.load(str(trained["reg", 1][1] / "checkpoint.h5"))
    assert api_run.scaling.to_json() == cli_run.scaling.to_json()
    np.testing.assert_array_equal(api_run.params, cli_run.params)


def test_resume_and_init_keep_the_networks_own_scaling(files, trained, tmp_path):
    run_dir = trained["1 rank"][1]
    ok(run_mpinn(2, "train", "--init", run_dir / "checkpoint.h5", "--data", files["cls"],
                 *COMMON, "--run-dir", tmp_path / "init"))
    assert scaling_of(tmp_path / "init").to_json() == scaling_of(run_dir).to_json()
    r = run_mpinn(2, "train", "--init", run_dir / "checkpoint.h5", "--data", files["cls"],
                  *COMMON, "--scale-inputs", "minmax", "--run-dir", tmp_path / "other")
    assert r.returncode == 2 and "differ from the start checkpoint's (standard, none)" in r.stderr


def test_unscaled_features_of_very_different_scales_are_named_once(files, tmp_path):
    r = ok(run_mpinn(2, "train", "--data", files["cls"], *COMMON, "--run-dir", tmp_path / "r"))
    assert r.stderr.count("consider --scale-inputs standard") == 1, r.stderr


def test_targets_of_a_classifier_are_not_scaled(files, tmp_path):
    r = run_mpinn(2, "train", "--data", files["cls"], "--scale-targets", "standard",
                  "--run-dir", tmp_path / "r")
    assert r.returncode == 2 and "--scale-targets standard is for --loss mse" in r.stderr
    assert r.stderr.count("mpinn: error") == 1


def test_data_stats_are_what_training_fits(files, trained):
    r = ok(run_mpinn(1, "data", "stats", files["reg"], "--json", "--chunk-rows", 50))
    report = json.loads(r.stdout)
    x, y = files["x"].astype(np.float64), files["y_reg"].astype(np.float64)
    assert report["rows"] == N and "consider --scale-inputs standard" in report["warning"]
    np.testing.assert_allclose(report["inputs"]["mean"], x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(report["inputs"]["std"], x.std(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(report["inputs"]["min"], x.min(0))
    np.testing.assert_allclose(report["targets"]["std"], y.std(0), rtol=1e-10)
    text = ok(run_mpinn(1, "data", "stats", files["cls"])).stdout
    assert f"{N} rows" in text and "inputs (X): column, mean, std, min, max" in text
    assert "targets" not in text  # integer labels are not summarised as targets
