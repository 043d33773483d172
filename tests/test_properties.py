"""Property-based tests (hypothesis): any config file and any data file either works or fails with
the clear-error contract (exit 2, one `mpinn: error` line, no traceback), never anything else.
Runs in-process on one rank (a 1-rank MPI world)."""
import dataclasses
import string

import h5py
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpinn.cli import main, parse
from mpinn.config import TrainConfig
from mpinn.errors import UsageError

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
KEYS = st.sampled_from(sorted(FIELDS) + ["learning_rate", "bogus", "hidden-layers"])
VALUES = st.one_of(st.integers(-5, 300), st.floats(-10, 10),
                   st.sampled_from([float("nan"), float("inf")]), st.booleans(),
                   st.text(string.ascii_letters + string.digits + ",._-", max_size=12),
                   st.lists(st.integers(-2, 50), max_size=4))
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, float) and not np.isfinite(v):
        return "nan" if np.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, list):
        return "[" + ", ".join(str(i) for i in v) + "]"
    return repr(v)


@SETTINGS
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_config_parses_or_is_a_usage_error(tmp_path, entries):
    path = tmp_path / "run.toml"
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in entries.items()))
    try:
        _, cfg, explicit = parse(["train", "--config", str(path)])
    except UsageError as e:
        assert str(e) and "\n" not in str(e)
        return
    for key, given in entries.items():  # noqa: F402 - the value given, not hypothesis's given
        name = key.replace("-", "_")
        assert name in FIELDS and name in explicit
        assert getattr(cfg, name) == documented_conversion(name, given), (key, given)


def documented_conversion(name, value):
    """What a TOML value becomes (docs/usage.md): ints are accepted for floats, a list of widths
    for --hidden, true/false for --shuffle (rank/none); anything else is taken as it is."""
    if FIELDS[name].type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if name == "hidden" and isinstance(value, list):
        return ",".join(str(v) for v in value)
    if name == "shuffle" and isinstance(value, bool):
        return "rank" if value else "none"
    return value


DTYPES = st.sampled_from(["float32", "float64", "int32", "uint8", "bool", "S3"])


@st.composite
def data_files(draw):
    n = draw(st.integers(0, 24))
    x_shape = draw(st.sampled_from([(n,), (n, draw(st.integers(0, 5))), (n, 2, 2)]))
    y_rows = draw(st.sampled_from([n, n, n, max(n - 1, 0), n + 2]))
    y_shape = draw(st.sampled_from([(y_rows,), (y_rows, 2)]))
    x_dtype, y_dtype = draw(DTYPES), draw(st.sampled_from(["int64", "int8", "float32", "bool"]))
    special = draw(st.sampled_from([None, None, None, np.nan, np.inf]))
    return (
        x_shape,
        x_dtype,
        y_shape,
        y_dtype,
        special,
        draw(st.sampled_from(["cross_entropy", "mse"])),
    )


def write(path, x_shape, x_dtype, y_shape, y_dtype, special, seed):
    rng = np.random.default_rng(seed)
    if x_dtype == "S3":
        x = np.full(x_shape, b"abc")
    else:
        x = (rng.normal(size=x_shape) * 3).astype(x_dtype)
        if special is not None and x.size and x.dtype.kind == "f":
            x.flat[0] = special
    y = rng.integers(0, 3, size=y_shape).astype(y_dtype)
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = x, y


@SETTINGS
@given(data_files(), st.integers(0, 10_000))
def test_any_data_file_trains_or_fails_clearly(tmp_path, capsys, spec, seed):
    x_shape, x_dtype, y_shape, y_dtype, special, loss = spec
    path = tmp_path / f"d{seed}.h5"
    write(path, x_shape, x_dtype, y_shape, y_dtype, special, seed)
    code = main(["train", "--data", str(path), "--val-data", "", "--epochs", "1", "--batch-size",
                 "8", "--hidden", "4", "--loss", loss, "--run-dir", str(tmp_path / f"r{seed}"),
                 "--log-every", "100", "--stall-warning", "0"])
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("mpinn: error")]
    assert "Traceback" not in err
    if code == 0:
        assert not errors
    else:
        assert code == 2 and len(errors) == 1, (code, err)
