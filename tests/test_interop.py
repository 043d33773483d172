"""`mpinn data convert` (npz, CSV, IDX; streaming; stratified split) and `mpinn export` (ONNX run
by onnxruntime, a PyTorch state dict, npz), each on real files the test writes."""
import csv
import gzip
import itertools

import h5py
import numpy as np
import pytest

from helpers import ROOT, ok, run_many, run_mpinn
from mpinn.cli import main

DIGITS_TEST = ROOT / "data" / "digits-test.h5"


def read(path):
    with h5py.File(path, "r") as f:
        return f["X"][...], f["y"][...], f["X"].chunks


def data(n=57, f=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, f)).astype(np.float32), rng.integers(0, k, n)


@pytest.mark.parametrize("chunk", [7, 1000])
def test_convert_npz_streams_any_chunking(tmp_path, chunk):
    x, y = data()
    np.savez(tmp_path / "d.npz", inputs=x, labels=y)
    assert main(["data", "convert", str(tmp_path / "d.npz"), "--x-key", "inputs", "--y-key",
                 "labels", "--out", str(tmp_path / "d.h5"), "--chunk-rows", str(chunk),
                 "--compression", "gzip"]) == 0
    X, Y, chunks = read(tmp_path / "d.h5")
    np.testing.assert_array_equal(X, x)
    np.testing.assert_array_equal(Y, y)
    assert Y.dtype == np.int64 and chunks == (chunk, 5)


def test_convert_csv_with_header_label_by_name_and_without_header(tmp_path):
    x, y = data()
    with open(tmp_path / "h.csv", "w") as fh:
        fh.write("a,label,b,c,d,e\n")
        for row, label in zip(x, y):
            fh.write(
                ",".join([repr(float(row[0])), str(label)] + [repr(float(v)) for v in row[1:]])
                + "\n"
            )
    assert main(["data", "convert", str(tmp_path / "h.csv"), "--label-column", "label", "--out",
                 str(tmp_path / "h.h5"), "--chunk-rows", "10"]) == 0
    X, Y, _ = read(tmp_path / "h.h5")
    np.testing.assert_allclose(X, x, rtol=1e-6)
    np.testing.assert_array_equal(Y, y)
    t = np.column_stack([x, y + 0.5])  # float targets in the last column, no header, gzipped
    with gzip.open(tmp_path / "n.csv.gz", "wt") as fh:
        np.savetxt(fh, t, delimiter=",")
    assert (
        main(["data", "convert", str(tmp_path / "n.csv.gz"), "--out", str(tmp_path / "n.h5")]) == 0
    )
    X, Y, _ = read(tmp_path / "n.h5")
    assert Y.dtype == np.float32 and np.allclose(Y, y + 0.5) and X.shape == (57, 5)


def write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + array.tobytes())


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_convert_idx_pair_with_scale(tmp_path, suffix):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 4, 4)).astype(np.uint8)
    labels = rng.integers(0, 10, 30).astype(np.uint8)
    write_idx(tmp_path / f"img.idx{suffix}", images, 0x08)
    write_idx(tmp_path / f"lab.idx{suffix}", labels, 0x08)
    assert main(["data", "convert", str(tmp_path / f"img.idx{suffix}"), "--labels",
                 str(tmp_path / f"lab.idx{suffix}"), "--format", "idx", "--scale", str(1 / 255),
                 "--out", str(tmp_path / "m.h5"), "--chunk-rows", "8"]) == 0
    X, Y, _ = read(tmp_path / "m.h5")
    np.testing.assert_allclose(X, images.reshape(30, 16) / 255, rtol=1e-6)
    np.testing.assert_array_equal(Y, labels)


def test_convert_split_is_stratified_and_complete(tmp_path):
    x, y = data(n=1000, k=4, seed=3)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    assert main(["data", "convert", str(tmp_path / "d.npz"), "--out", str(tmp_path / "d.h5"),
                 "--split", "0.9", "--chunk-rows", "64"]) == 0
    Xa, Ya, _ = read(tmp_path / "d-train.h5")
    Xb, Yb, _ = read(tmp_path / "d-test.h5")
    assert len(Ya) + len(Yb) == 1000
    for c in range(4):
        assert abs((Ya == c).sum() - round(0.9 * (y == c).sum())) <= 1
    rows = {tuple(r) for r in np.concatenate([Xa, Xb])}
    assert rows == {tuple(r) for r in x}  # every row once, nothing lost


def test_convert_targets_values_makes_regression_targets_and_a_random_split(tmp_path):
    """Whole-number regression targets (prices): auto takes them for 96 classes and cannot split
    them by class (said, with the option that can); --targets values writes float32 targets and
    splits the rows 80/20 at random."""
    rng = np.random.default_rng(4)
    x, price = rng.normal(size=(100, 2)), rng.integers(100, 5000, 100)
    with open(tmp_path / "r.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "price"])
        w.writerows([*row, p] for row, p in zip(x.tolist(), price.tolist()))
    convert = ["data", "convert", str(tmp_path / "r.csv"), "--split", "0.8"]
    assert main([*convert, "--out", str(tmp_path / "auto.h5")]) == 2
    assert main([*convert, "--out", str(tmp_path / "v.h5"), "--targets", "values"]) == 0
    _, ya, _ = read(tmp_path / "v-train.h5")
    _, yb, _ = read(tmp_path / "v-test.h5")
    assert ya.dtype == yb.dtype == np.float32 and (len(ya), len(yb)) == (80, 20)
    assert sorted(np.concatenate([ya, yb]).tolist()) == sorted(price.tolist())


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/none.csv"], "input file not found"),
    (["{tmp}/reg.csv", "--split", "0.8"], "(labels that are regression targets: --targets "
                                          "values splits rows, not classes)"),
    (["{tmp}/iris.csv", "--targets", "values"], "--targets values: the labels of"),
    (["{tmp}/float.csv", "--targets", "classes"], "--targets classes: the labels of"),
    (["{tmp}/d.npz", "--x-key", "inputs"], "no array 'inputs' (found: X, y)"),
    (["{tmp}/d.csv", "--label-column", "price"], "--label-column 'price': no such column"),
    (["{tmp}/d.txt"], "cannot tell the format"),
    (["{tmp}/d.npz", "--split", "1.5"], "--split must be in [0, 1)"),
    (["{tmp}/d.npz", "--out", "{tmp}/missing/o.h5"], "does not exist"),
])
def test_convert_errors(tmp_path, capsys, argv, message):
    x, y = data()
    np.savez(tmp_path / "d.npz", X=x, y=y)
    np.savetxt(tmp_path / "d.csv", np.column_stack([x, y]), delimiter=",")
    (tmp_path / "d.txt").write_text("1,2\n")
    (tmp_path / "reg.csv").write_text("a,y\n" + "".join(f"{i},{i * 7}\n" for i in range(9)))
    (tmp_path / "iris.csv").write_text("a,y\n1,setosa\n2,virginica\n")
    (tmp_path / "float.csv").write_text("a,y\n1,0.5\n2,1.5\n")
    code = main(["data", "convert", *[a.format(tmp=tmp_path) for a in argv]])
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("mpinn: error")]
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


ACTIVATIONS = {"leaky_relu": ["--leaky-slope", "0.1"], "softplus": [], "gelu": [],
               "gelu_tanh": [], "silu": []}  # each exported after training on reg.h5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    with h5py.File(d / "reg.h5", "w") as f:
        f["X"], f["y"] = x, (x[:, :2] > 0).astype(np.float32)
    jobs = {"ce": (1, ["train", "--epochs", 3, "--run-dir", d / "ce"]),
            "mse": (1, ["train", "--data", d / "reg.h5", "--loss", "mse", "--output-activation",
                        "sigmoid", "--activation", "tanh", "--hidden", "8", "--epochs", 5,
                        "--run-dir", d / "mse"])}
    jobs["float64"] = (1, ["train", "--data", d / "reg.h5", "--loss", "mse", "--dtype", "float64",
                           "--scale-inputs", "standard", "--scale-targets", "standard",
                           "--hidden", "8,8", "--epochs", 5, "--run-dir", d / "float64"])
    for (act, extra), dtype in itertools.product(ACTIVATIONS.items(), ("float32", "float64")):
        key = act if dtype == "float32" else f"{act}-float64"
        jobs[key] = (1, ["train", "--data", d / "reg.h5", "--loss", "mse", "--activation", act,
                         *extra, "--dtype", dtype, "--hidden", "8,8", "--epochs", 5, "--run-dir",
                         d / key])
    for key in list(jobs):  # then `mpinn predict` of each, in the same launch (after them)
        jobs["predict", key] = (1, ["predict", "--checkpoint", d / key / "checkpoint.h5", "--data",
                                    DIGITS_TEST if key == "ce" else d / "reg.h5", "--out",
                                    d / f"predicted-{key}.h5"])
    for key in ("ce", "mse", "float64"):  # and `mpinn evaluate`
        jobs["evaluate", key] = (1, ["evaluate", "--checkpoint", d / key / "checkpoint.h5",
                                     *([] if key == "ce" else ["--data", d / "reg.h5"])])
    runs = run_many(jobs, d / "launch")
    for run in runs.values():
        ok(run)
    return {**{key: d / key / "checkpoint.h5" for key in jobs if isinstance(key, str)},
            "mse_data": d / "reg.h5", "predicted": d,
            "evaluated": {key[1]: run.stdout for key, run in runs.items() if key[0] == "evaluate"}}


@pytest.mark.parametrize("key,says", [("ce", "(mean cross-entropy), accuracy"),
                                      ("mse", "(mean squared error)\n"),
                                      ("float64", "(mean squared error, of the scaled targets)")])
def test_evaluate_says_what_its_loss_is(trained, key, says):
    assert says in trained["evaluated"][key]


def predictions(trained, key):
    """What `mpinn predict` wrote for that network's data (the fixture ran it)."""
    with h5py.File(trained["predicted"] / f"predicted-{key}.h5", "r") as f:
        return f["prob"][...] if "prob" in f else f["output"][...]


@pytest.mark.parametrize("kind", ["ce", "mse", *ACTIVATIONS, "float64",
                                  *(f"{act}-float64" for act in ACTIVATIONS)])
def test_onnx_export_matches_predict(trained, tmp_path, kind):
    """float64: a graph of doubles (and its scaling) that gives predict's float64 outputs, for
    every activation (gelu's erf taken in float32: onnxruntime has no double Erf)."""
    import onnxruntime as ort
    data_file = DIGITS_TEST if kind == "ce" else trained["mse_data"]
    assert main(["export", "--checkpoint", str(trained[kind]), "--format", "onnx", "--out",
                 str(tmp_path / "m.onnx")]) == 0
    dtype = np.float64 if kind.endswith("float64") else np.float32
    with h5py.File(data_file, "r") as f:
        x = f["X"][...].astype(dtype)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(["y"], {"x": x})[0]
    expected = predictions(trained, kind)
    assert got.dtype == expected.dtype == dtype
    bound = 1e-5 if dtype == np.float32 else 1e-7 if kind == "gelu-float64" else 1e-12
    assert np.abs(got - expected).max() <= bound


def test_torch_export_loads_into_sequential(trained, tmp_path, capsys):
    import torch
    assert main(["export", "--checkpoint", str(trained["ce"]), "--format", "torch", "--out",
                 str(tmp_path / "m.pt")]) == 0
    assert (
        "torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU()" in capsys.readouterr().out
    )
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 10))
    model.load_state_dict(torch.load(tmp_path / "m.pt"))
    with h5py.File(DIGITS_TEST, "r") as f:
        x = torch.tensor(f["X"][...], dtype=torch.float32)
    probs = torch.softmax(model(x), dim=1).detach().numpy()
    np.testing.assert_allclose(probs, predictions(trained, "ce"), atol=1e-5)


def test_torch_export_of_a_leaky_relu_network_keeps_its_slope(trained, tmp_path, capsys):
    import torch
    assert main(["export", "--checkpoint", str(trained["leaky_relu"]), "--format", "torch",
                 "--out", str(tmp_path / "m.pt")]) == 0
    assert "torch.nn.LeakyReLU(0.1), torch.nn.Linear(8, 8)" in capsys.readouterr().out
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.LeakyReLU(0.1),
                                torch.nn.Linear(8, 8), torch.nn.LeakyReLU(0.1),
                                torch.nn.Linear(8, 2))
    model.load_state_dict(torch.load(tmp_path / "m.pt"))
    with h5py.File(trained["mse_data"], "r") as f:
        x = torch.tensor(f["X"][...], dtype=torch.float32)
    np.testing.assert_allclose(model(x).detach().numpy(),
                               predictions(trained, "leaky_relu"),
                               atol=1e-5)


@pytest.mark.parametrize("act,module,kw", [("gelu", "GELU", {}),
                                           ("gelu_tanh", "GELU", {"approximate": "tanh"}),
                                           ("silu", "SiLU", {})])
def test_torch_export_of_gelu_and_silu_networks(trained, tmp_path, capsys, act, module, kw):
    import torch
    assert main(["export", "--checkpoint", str(trained[act]), "--format", "torch",
                 "--out", str(tmp_path / "m.pt")]) == 0
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    assert f"torch.nn.{module}({args}), torch.nn.Linear(8, 8)" in capsys.readouterr().out
    layer = getattr(torch.nn, module)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), layer(**kw), torch.nn.Linear(8, 8),
                                layer(**kw), torch.nn.Linear(8, 2))
    model.load_state_dict(torch.load(tmp_path / "m.pt"))
    with h5py.File(trained["mse_data"], "r") as f:
        x = torch.tensor(f["X"][...], dtype=torch.float32)
    np.testing.assert_allclose(model(x).detach().numpy(),
                               predictions(trained, act),
                               atol=1e-5)


def test_torch_export_of_a_float64_network_is_double(trained, tmp_path, capsys):
    import torch
    assert main(["export", "--checkpoint", str(trained["float64"]), "--format", "torch",
                 "--out", str(tmp_path / "m.pt")]) == 0
    assert "torch.nn.Linear(8, 2)).double(); model.load_state_dict" in capsys.readouterr().out
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()
    state = torch.load(tmp_path / "m.pt")
    assert all(t.dtype == torch.float64 for t in state.values())
    model.load_state_dict(state)
    with h5py.File(trained["mse_data"], "r") as f:
        x = torch.tensor(f["X"][...], dtype=torch.float64)
    np.testing.assert_allclose(model(x).detach().numpy(),  # the scaling folded in, in float64
                               predictions(trained, "float64"),
                               rtol=1e-12, atol=1e-12)


def test_npz_export_reproduces_predictions_with_numpy(trained, tmp_path):
    assert main(["export", "--checkpoint", str(trained["ce"]), "--format", "npz", "--out",
                 str(tmp_path / "m.npz")]) == 0
    z = np.load(tmp_path / "m.npz")
    with h5py.File(DIGITS_TEST, "r") as f:
        h = f["X"][...].astype(np.float64)
    layers = len(z["sizes"]) - 1
    for l in range(layers):
        h = h @ z[f"W{l}"] + z[f"b{l}"]
        if l < layers - 1:
            h = np.maximum(h, 0)
    p = np.exp(h - h.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(p, predictions(trained, "ce"), atol=1e-5)
    assert str(z["activation"]) == "relu" and list(z["sizes"]) == [64, 128, 64, 10]


def test_export_errors(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "none.h5")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def write_table(path, rows, header=None, sep=",", opener=open):
    with opener(path, "wt", newline="") as fh:
        w = csv.writer(fh, delimiter=sep)
        if header:
            w.writerow(header)
        w.writerows(rows)


def test_csv_text_classes_quotes_and_semicolons_end_in_predictions_by_name(tmp_path):
    """The README's kind of table: a header, text class names (one with the delimiter quoted in
    it), ';' separators. The names travel: HDF5 attribute -> checkpoint -> predict's label."""
    x, y = data(n=300, f=4, k=3, seed=5)
    names = ["setosa", "versi; color", "virginica"]
    write_table(tmp_path / "iris.csv", [[f"{v:.6f}" for v in r] + [names[l]] for r, l in zip(x, y)],
                ["sepal length", "sepal width", "petal length", "petal width", "species"], ";")
    assert main(["data", "convert", str(tmp_path / "iris.csv"), "--delimiter", ";",
                 "--label-column", "species", "--out", str(tmp_path / "iris.h5")]) == 0
    X, Y, _ = read(tmp_path / "iris.h5")
    np.testing.assert_allclose(X, x, atol=1e-6)
    np.testing.assert_array_equal(Y, y)  # the names sort as setosa < versi; color < virginica
    with h5py.File(tmp_path / "iris.h5") as f:
        assert [v.decode() if isinstance(v, bytes) else v for v in f["y"].attrs["classes"]] == names
    ok(
        run_mpinn(
            2, "train", "--data", tmp_path / "iris.h5", "--epochs", 3, "--run-dir", tmp_path / "r"
        )
    )
    from mpinn import checkpoint
    ckpt = checkpoint.load(str(tmp_path / "r" / "checkpoint.h5"))
    assert ckpt.config["class_names"] == names and ckpt.arch.sizes[-1] == 3
    ok(run_mpinn(1, "predict", "--checkpoint", tmp_path / "r" / "checkpoint.h5", "--data",
                 tmp_path / "iris.h5", "--out", tmp_path / "p.csv"))
    ok(run_mpinn(1, "predict", "--checkpoint", tmp_path / "r" / "checkpoint.h5", "--data",
                 tmp_path / "iris.h5", "--out", tmp_path / "p.h5"))
    rows = list(csv.reader(open(tmp_path / "p.csv", newline="")))
    assert rows[0] == ["pred", "label", "p0", "p1", "p2"] and len(rows) == 301
    assert all(r[1] == names[int(r[0])] for r in rows[1:])
    with h5py.File(tmp_path / "p.h5") as f:
        labels = [v.decode() for v in f["label"][...]]
        assert labels == [names[p] for p in f["pred"][...]]


def test_csv_tab_gzip_numbers_as_text_and_no_header(tmp_path):
    x, y = data(n=40, f=3, k=4, seed=2)
    write_table(tmp_path / "t.csv.gz", [[f"{v:.6f}" for v in r] + [str(l)] for r, l in zip(x, y)],
                sep="\t", opener=gzip.open)
    assert main(["data", "convert", str(tmp_path / "t.csv.gz"), "--delimiter", "tab", "--out",
                 str(tmp_path / "t.h5")]) == 0
    X, Y, _ = read(tmp_path / "t.h5")
    assert X.shape == (40, 3) and Y.dtype == np.int64
    np.testing.assert_array_equal(Y, y)  # whole numbers stay class numbers, no names stored
    with h5py.File(tmp_path / "t.h5") as f:
        assert "classes" not in f["y"].attrs


@pytest.mark.parametrize("rows,message", [
    ([["1", "2", "a"], ["3", "", "b"]], "line 3: 'f2' is empty"),
    ([["1", "2", "a"], ["3", "zz", "b"]], "line 3: 'f2' holds text ('zz') where a number belongs"),
    ([["1", "2", "a"], ["3", "4", ""]], "line 3: 'label' is empty"),
])
def test_csv_bad_cells_are_one_error_naming_line_and_column(tmp_path, rows, message, capsys):
    write_table(tmp_path / "bad.csv", rows, ["f1", "f2", "label"])
    assert (
        main(["data", "convert", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "b.h5")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "b.h5").exists()
