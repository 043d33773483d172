"""HPC workflow: bench figures, the alpha-beta model, the report from bench results, the scale
series with real mpiexec runs, and the Chrome-trace timeline."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ok, run_mpinn, steps_per_epoch
from mpinn.cli import parse
from mpinn.errors import UsageError
from mpinn.hpc import perfmodel
from mpinn.hpc.bench import training_flops
from mpinn.hpc.report import build


def test_training_flops_are_exact():
    # 3 -> 4 -> 2, 5 rows: layer 0: fwd + weight grad (no input grad) = 4*3*4*5; layer 1: 6*4*2*5
    assert training_flops((3, 4, 2), 5) == 4 * 3 * 4 * 5 + 6 * 4 * 2 * 5


def test_alpha_beta_fit_recovers_the_model():
    alpha, beta = 3e-6, 5e9
    pts = [(n, p, perfmodel.allreduce_time(n, p, alpha, beta)) for p in (2, 4)
           for n in (4, 256, 65536, 1 << 22)]
    a, b = perfmodel.fit_alpha_beta(pts)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)
    assert max(abs(perfmodel.allreduce_time(n, p, a, b) / t - 1) for n, p, t in pts) < 1e-6
    with pytest.raises(UsageError, match="needs Allreduce times"):
        perfmodel.fit_alpha_beta([(4, 1, 1e-6)])


def test_projection_definitions():
    Link = perfmodel.Link
    # no communication cost: strong efficiency falls only through the fixed per-step time
    free = perfmodel.StepModel(1e-3, 0.0, 0)
    proj = free.project("strong", 1024, Link(1e-9, 1e30), ranks=[1, 8])
    assert proj[1][2] == pytest.approx(1.0, rel=1e-6)
    t1 = 1e-3 * 1024 + 2e-3
    a, b = 2e-6, 1e9
    model = perfmodel.StepModel(1e-3, 2e-3, 4e6)
    (p, t, e), = model.project("weak", 1024, Link(a, b), ranks=[8])
    assert t == pytest.approx(t1 + 2 * 3 * a + 2 * 7 / 8 * 4e6 / b)
    assert e == pytest.approx(t1 / t)
    (p, t, e), = model.project("strong", 1024, Link(a, b), ranks=[8])
    assert e == pytest.approx(t1 / (8 * t))
    # sharded: the same bytes, the optimizer divided by the ranks
    (p, ts, es), = model.project("strong", 1024, Link(a, b), shard=True, ranks=[8])
    assert ts == pytest.approx(t - 2e-3 + 2e-3 / 8) and es > e
    # 4 ranks per node: 2 nodes between (inter link) and 4 ranks inside (intra link)
    model.intra = Link(1e-6, 5e9)
    (p, t4, _), = model.project("weak", 1024, Link(a, b), per_node=4, ranks=[8])
    assert t4 == pytest.approx(t1 + 2 * 2 * 1e-6 + 2 * 3 / 4 * 4e6 / 5e9
                               + 2 * 1 * a + 2 * 1 / 2 * 4e6 / b)
    assert perfmodel.network("infiniband-hdr")[1] == (1.5e-6, 25e9)
    with pytest.raises(UsageError, match="unknown --network"):
        perfmodel.network("carrier-pigeon")
    with pytest.raises(UsageError, match="intra-node Allreduce measured"):
        perfmodel.StepModel(1e-3, 0, 4e6).project("weak", 64, Link(a, b), per_node=2)


def test_two_level_fit_recovers_both_links():
    intra, inter = perfmodel.Link(2e-6, 6e9), perfmodel.Link(40e-6, 1.2e8)
    sizes = (64, 4096, 1 << 18, 1 << 22)
    pts = [(n, N, r, perfmodel.two_level_allreduce(n, N, r, intra, inter))
           for N, r in ((1, 2), (1, 4), (2, 1), (2, 2), (4, 2)) for n in sizes]
    got_intra, got_inter = perfmodel.fit_two_level(pts)
    assert got_intra.alpha == pytest.approx(intra.alpha, rel=1e-6)
    assert got_intra.beta == pytest.approx(intra.beta, rel=1e-6)
    assert got_inter.alpha == pytest.approx(inter.alpha, rel=1e-6)
    assert got_inter.beta == pytest.approx(inter.beta, rel=1e-6)
    # one-node runs only: no inter-node link; multi-node runs with 2 per node need the intra fit
    assert perfmodel.fit_two_level([p for p in pts if p[1] == 1])[1] is None
    assert perfmodel.fit_two_level([p for p in pts if p[2] == 2 and p[1] > 1]) == (None, None)
    only_inter = perfmodel.fit_two_level([p for p in pts if p[2] == 1])
    assert only_inter[0] is None and only_inter[1].beta == pytest.approx(inter.beta, rel=1e-6)


@pytest.fixture(scope="module")
def bench_runs():
    out = {}
    for ranks in (1, 2):
        r = ok(run_mpinn(ranks, "bench", "--features", 64, "--hidden", "128,128", "--batch-size",
                         256, "--steps", 20, "--warmup", 3, "--json", "--allreduce-sweep",
                         "--sweep-max", 1 << 20))
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 1  # rank 0 prints one JSON object
        out[ranks] = json.loads(lines[0])
    return out


def test_bench_reports_phases_and_rates(bench_runs):
    two = bench_runs[2]
    for key in ("ranks", "layers", "batch_per_rank", "samples_per_s", "step_ms", "phases_ms",
                "gflops", "mpi_library", "load_imbalance", "allreduce_sweep"):
        assert key in two, key
    assert (
        two["ranks"] == 2 and two["layers"] == [64, 128, 128, 10] and two["batch_per_rank"] == 128
    )
    assert two["samples_per_s"] == pytest.approx(256 / (two["step_ms"] / 1e3))
    assert two["gflops"] == pytest.approx(training_flops(two["layers"], 256) / two["step_ms"] / 1e6)
    for phase in ("data", "compute", "allreduce", "optimizer"):
        ph = two["phases_ms"][phase]
        assert ph["mean"] > 0 and ph["max"] <= two["step_ms"] * 1.5, phase
    compute = two["phases_ms"]["compute"]
    assert two["load_imbalance"] == pytest.approx(compute["max"] / compute["mean"], rel=1e-6)
    sizes = [p["bytes"] for p in two["allreduce_sweep"]]
    assert sizes == [4 ** k for k in range(1, 11)] and all(p["seconds"] > 0
                                                            for p in two["allreduce_sweep"])
    assert bench_runs[1]["allreduce_sweep"] == []
    library = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; "
                              "print(' '.join(MPI.Get_library_version().split()[:3]))"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    assert library and two["mpi_library"] == library  # whichever MPI this machine has
    import scipy.linalg.cython_blas  # noqa: F401 - the BLAS Numba calls
    from threadpoolctl import threadpool_info
    (scipy_blas,) = [p for p in threadpool_info() if "/scipy.libs/" in p["filepath"]]
    assert two["blas"]["library"] == scipy_blas["internal_api"]
    assert two["blas"]["architecture"] == scipy_blas["architecture"]
    assert two["blas"]["sgemm_peak_gflops"] > 1
    assert two["engine_step_ms"] <= two["step_ms"]


def test_report_from_bench_results(bench_runs, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for k, r in bench_runs.items():
        (raw / f"b{k}.json").write_text(json.dumps(r))
    _, cfg, _ = parse(["report", "--results", str(raw), "--out", str(tmp_path / "rep"),
                       "--network", "infiniband-hdr"])
    rows, model = build(cfg)
    assert model["mode"] == "strong" and model["network"] == "infiniband-hdr"
    t1, t2 = bench_runs[1]["step_ms"], bench_runs[2]["step_ms"]
    assert rows[1]["efficiency"] == pytest.approx(t1 / (2 * t2))  # strong: t1 / (N tN)
    assert model["intra"]["alpha"] > 0 and model["intra"]["beta"] > 0 and model["inter"] is None
    assert math.isfinite(rows[1]["model_error"])
    assert json.loads((tmp_path / "rep" / "model.json").read_text())["projections"].keys() == {
        "infiniband-hdr", "ethernet-100g", "ethernet-25g"}
    table = list(csv.DictReader(open(tmp_path / "rep" / "results.csv")))
    assert [int(r["ranks"]) for r in table] == [1, 2]
    md = (tmp_path / "rep" / "report.md").read_text()
    for png in ("speedup", "efficiency", "breakdown", "allreduce", "projection"):
        assert f"]({png}.png)" in md and (tmp_path / "rep" / f"{png}.png").stat().st_size > 10_000
    assert "| 4096 |" in md and "| 8 |" in md  # projection rows
    assert "| ranks | infiniband-hdr | ethernet-100g | ethernet-25g |" in md
    assert "- between nodes, fitted on multi-node runs: not measured" in md
    assert f"BLAS: {bench_runs[1]['blas']['library']} " in md and "sgemm peak" in md
    # --alpha/--beta override the network: a slow link (1 ms, 1 MB/s) projects far lower
    _, slow, _ = parse(["report", "--results", str(raw), "--out", str(tmp_path / "slow"),
                        "--alpha", "1e-3", "--beta", "1e6"])
    _, slow_model = build(slow)
    assert (slow_model["alpha"], slow_model["beta"]) == (1e-3, 1e6)
    assert "alpha=0.001 s, beta=1e+06 B/s" in slow_model["network"]
    assert "(α = 1000.00 µs, β = 0.00 GB/s)" in (tmp_path / "slow" / "report.md").read_text()


def test_weak_mode_and_bad_results(tmp_path, bench_runs):
    raw = tmp_path / "raw"
    raw.mkdir()
    for k in (1, 2):
        r = dict(bench_runs[k], global_batch=128 * k, batch_per_rank=128,
                 samples_per_s=128 * k / (bench_runs[k]["step_ms"] / 1e3))
        (raw / f"b{k}.json").write_text(json.dumps(r))
    _, cfg, _ = parse(["report", "--results", str(raw), "--out", str(tmp_path / "w")])
    rows, model = build(cfg)
    assert model["mode"] == "weak"
    assert rows[1]["efficiency"] == pytest.approx(
        bench_runs[1]["step_ms"] / bench_runs[2]["step_ms"]
    )
    with pytest.raises(UsageError, match="holds a report .report.md.; choose another folder or "
                                         "pass --overwrite"):
        build(cfg)  # a second report into the same folder is refused unasked
    (raw / "junk.json").write_text("{}")
    _, cfg, _ = parse(["report", "--results", str(raw), "--out", str(tmp_path / "w"),
                       "--overwrite"])
    with pytest.raises(UsageError, match="not an `mpinn bench --json` result"):
        build(cfg)


def test_scale_runs_the_series_and_flags_oversubscription(tmp_path):
    """With as many threads per rank as the machine has cores, 1 rank fits and 2 do not, on any
    machine."""
    cores = os.cpu_count()
    r = ok(run_mpinn(1, "scale", "--mode", "weak", "--ranks", "1,2", "--features", 32,
                     "--hidden", "32", "--batch-per-rank", 64, "--steps", 5, "--warmup", 1,
                     "--threads", cores, "--sweep-max", 4096, "--out", tmp_path / "s",
                     "--network", "ethernet-25g", timeout=240))
    assert f"2 rank(s) x {cores} thread(s) (oversubscribed: more ranks than cores)" in r.stdout
    assert "1 rank(s) x {cores} thread(s) (oversubscribed" not in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert [int(x["ranks"]) for x in rows] == [1, 2]
    assert [x["oversubscribed"] for x in rows] == ["False", "True"]
    assert "oversubscribed" in (tmp_path / "s" / "report.md").read_text()


def test_scale_cores_compares_the_ranks_x_threads_splits(tmp_path):
    r = ok(run_mpinn(1, "scale", "--cores", 2, "--features", 32, "--hidden", "64", "--batch-size",
                     256, "--steps", 5, "--warmup", 1, "--sweep-max", 4096, "--out",
                     tmp_path / "m", timeout=240))
    assert "1 rank(s) x 2 thread(s)" in r.stdout and "2 rank(s) x 1 thread(s)" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "m" / "results.csv")))
    assert [(x["ranks"], x["threads"]) for x in rows] == [("1", "2"), ("2", "1")]
    best = max(rows, key=lambda x: float(x["samples_per_s"]))
    model = json.loads((tmp_path / "m" / "model.json").read_text())
    assert model["mode"] == "mix" and model["best"]["ranks"] == int(best["ranks"])
    md = (tmp_path / "m" / "report.md").read_text()
    assert f"**Best: {best['ranks']} rank(s) x {best['threads']} thread(s)**" in md
    assert f"best: {best['ranks']} rank(s) x {best['threads']} thread(s)" in r.stdout


@pytest.mark.parametrize("ranks, series", [
    ("1,2,4", [(1, None), (2, None), (4, None)]),
    ("1x1,2x1,1x2,2X2", [(1, 1), (2, 2), (2, 1), (4, 2)]),  # one node of 2 sorts before 2 of 1
])
def test_scale_series_placements(ranks, series):
    from mpinn.config import parse_ranks
    assert parse_ranks(ranks) == series


@pytest.mark.parametrize("args, message", [
    (["--ranks", "1,2x"], "rank counts K or placements NxR"),
    (["--ranks", "1,0x2"], "must be positive"),
    (["--ranks", "1x1,2x1"], "needs {ppn}"),
    (["--ranks", "2,4"], "needs 1 .the baseline."),
    (["--cores", "4", "--batch-size", "2"], "smaller than --cores 4"),
])
def test_scale_refuses_bad_series(args, message):
    with pytest.raises(UsageError, match=message):
        parse(["scale", *args])


def test_timeline_is_a_chrome_trace_with_a_lane_per_rank(tmp_path):
    ok(run_mpinn(2, "train", "--epochs", 1, "--run-dir", tmp_path / "r", "--timeline",
                 tmp_path / "t.json"))
    trace = json.load(open(tmp_path / "t.json"))
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    lanes = {e["args"]["name"]: e["tid"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert lanes == {"rank 0": 0, "rank 1": 1}
    for rank in (0, 1):
        names = [e["name"] for e in events if e["tid"] == rank]
        for phase in ("data", "forward", "backward", "allreduce", "optimizer"):
            assert names.count(phase) == steps_per_epoch(), (rank, phase)
        assert names.count("checkpoint") == 1 and names.count("evaluate") == 1
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in events)
    steps = sorted((e["ts"], e["name"]) for e in events if e["tid"] == 0)
    assert [n for _, n in steps[:5]] == ["data", "forward", "backward", "allreduce", "optimizer"]
    r = run_mpinn(2, "train", "--epochs", 1, "--run-dir", tmp_path / "r2", "--timeline",
                  tmp_path / "missing" / "t.json")
    assert r.returncode == 2 and "--timeline" in r.stderr


def test_blas_override_warning():
    from mpinn.hpc.machine import override_warning
    forced = {"OPENBLAS_CORETYPE": "Haswell"}
    haswell = {"library": "openblas", "version": "0.3.30", "architecture": "Haswell"}
    skylake = dict(haswell, architecture="SkylakeX")
    assert "AVX-512" in override_warning(haswell, True, forced)
    assert override_warning(haswell, False, forced) is None     # an AVX2 CPU: Haswell is right
    assert override_warning(skylake, True, forced) is None      # the override did no harm
    assert override_warning(haswell, True, {}) is None          # nothing forced it
    assert override_warning(dict(haswell, library="mkl"), True, forced) is None
