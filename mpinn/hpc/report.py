"""`mpinn report`: a scaling report from `mpinn bench --json` results (one file per run, from
`mpinn scale` on one node or from separate cluster jobs).

The report folder holds report.md (tables, the fitted alpha-beta model, its error on the measured
points, projections to 8 ... 4096 ranks), results.csv, and PNG plots: speedup against ideal,
efficiency, a stacked time breakdown per phase, the Allreduce fit, and measured efficiency together
with the projection.

Speedup and efficiency are relative to the smallest run b (normally 1 rank):
speedup(N) = b * throughput(N) / throughput(b), efficiency = speedup / N, which is t1/(N*tN) for
strong scaling (fixed global batch) and t1/tN for weak scaling (fixed batch per rank).
"""
import csv
import glob
import json
import os

import numpy as np

from . import perfmodel
from ..errors import UsageError
from ..log import Log

PHASES = ("data", "compute", "allreduce", "optimizer")
COLORS = {"data": "#8c8c8c", "compute": "#1f77b4", "allreduce": "#d62728", "optimizer": "#2ca02c",
          "other": "#dddddd"}


def load_results(spec):
    """Bench results from a folder of *.json files, or a comma-separated list of files."""
    paths = []
    for part in [p for p in str(spec).split(",") if p]:
        paths += sorted(glob.glob(os.path.join(part, "*.json"))) if os.path.isdir(part) else [part]
    if not paths:
        raise UsageError(f"--results {spec}: no bench JSON files found")
    runs = []
    for path in paths:
        try:
            with open(path) as fh:
                run = json.loads(fh.read().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError) as e:
            raise UsageError(f"{path} is not an `mpinn bench --json` result: {e}") from None
        if not isinstance(run, dict) or "step_ms" not in run or "ranks" not in run:
            raise UsageError(f"{path} is not an `mpinn bench --json` result (no step_ms/ranks)")
        runs.append(run)
    return sorted(runs, key=lambda r: r["ranks"])


def detect_mode(runs):
    if len({r["global_batch"] for r in runs}) == 1 and len(runs) > 1:
        return "strong"
    if len({r["batch_per_rank"] for r in runs}) == 1:
        return "weak"
    raise UsageError("the runs keep neither the global batch (strong) nor the batch per rank "
                     "(weak) fixed; say --mode")


def table(runs):
    """Rows of derived figures per run (relative to the smallest run)."""
    base = runs[0]
    rows = []
    for r in runs:
        speedup = base["ranks"] * r["samples_per_s"] / base["samples_per_s"]
        ph = r["phases_ms"]
        rows.append({
            "ranks": r["ranks"], "nodes": r.get("nodes", 1), "step_ms": r["step_ms"],
            "samples_per_s": r["samples_per_s"], "speedup": speedup,
            "efficiency": speedup / r["ranks"],
            "comm_fraction": ph["allreduce"]["max"] / r["step_ms"],
            "load_imbalance": r.get("load_imbalance", 1.0),
            **{f"{p}_ms": ph[p]["max"] for p in PHASES},
            "oversubscribed": bool(r.get("oversubscribed", False)),
        })
    return rows


def calibrate(runs):
    """Per-sample compute, per-step fixed time and gradient size from the smallest run."""
    base = runs[0]
    ph = base["phases_ms"]
    rows = base["global_batch"] / base["ranks"]
    per_sample = (ph["compute"]["mean"] + ph["data"]["mean"]) / 1e3 / rows
    return per_sample, ph["optimizer"]["mean"] / 1e3, base["gradient_bytes"]


def fit_runs(runs):
    """The multi-rank runs whose Allreduce times say something about the network: oversubscribed
    runs (ranks time-share cores) are left out unless there is nothing else."""
    multi = [r for r in runs if r["ranks"] > 1]
    fair = [r for r in multi if not r.get("oversubscribed")]
    return fair or multi


def allreduce_points(runs):
    """(bytes, ranks, seconds) from the sweeps, or from the steps' gradient Allreduce."""
    runs = fit_runs(runs)
    pts = [(p["bytes"], r["ranks"], p["seconds"]) for r in runs for p in r.get("allreduce_sweep", [])]
    if not pts:
        pts = [(r["gradient_bytes"], r["ranks"], r["phases_ms"]["allreduce"]["mean"] / 1e3)
               for r in runs if r["ranks"] > 1]
    return pts


def build(cfg):
    if os.path.exists(os.path.join(cfg.out, "report.md")) and not cfg.overwrite:
        raise UsageError(f"--out {cfg.out} holds a report (report.md); choose another folder or "
                         "pass --overwrite to replace it")
    runs = load_results(cfg.results)
    mode = cfg.mode if cfg.mode != "auto" else detect_mode(runs)
    rows = table(runs)
    os.makedirs(cfg.out, exist_ok=True)
    per_sample, fixed, grad_bytes = calibrate(runs)
    points = allreduce_points(runs)
    fitted = perfmodel.fit_alpha_beta(points) if len({(n, p) for n, p, _ in points}) >= 2 else None
    label, alpha, beta = perfmodel.network(cfg.network, cfg.alpha or None, cfg.beta or None, fitted)
    model = {"mode": mode, "per_sample_s": per_sample, "fixed_s": fixed,
             "gradient_bytes": grad_bytes, "network": label, "alpha": alpha, "beta": beta}
    if fitted:
        errors = perfmodel.relative_errors(points, *fitted)
        model["fitted_alpha"], model["fitted_beta"] = fitted
        model["allreduce_fit_error"] = {"median_abs": float(np.median(np.abs(errors))),
                                        "max_abs": float(np.max(np.abs(errors)))}
        for row, r in zip(rows, runs):
            rows_per_rank = r["global_batch"] / r["ranks"]
            pred = perfmodel.step_time(per_sample, rows_per_rank, fixed, grad_bytes, r["ranks"],
                                       *fitted)
            row["model_step_ms"] = pred * 1e3
            row["model_error"] = pred * 1e3 / r["step_ms"] - 1
    base = runs[0]
    projections = {m: perfmodel.project(m, per_sample, fixed, grad_bytes,
                                        base["global_batch"] if m == "strong"
                                        else base["batch_per_rank"], alpha, beta,
                                        [1, 2, 4] + perfmodel.PROJECT_RANKS)
                   for m in ("strong", "weak")}
    write_csv(os.path.join(cfg.out, "results.csv"), rows)
    plots = make_plots(cfg.out, rows, runs, mode, points, fitted, projections, label)
    write_markdown(os.path.join(cfg.out, "report.md"), cfg.title, runs, rows, mode, model,
                   projections, plots)
    with open(os.path.join(cfg.out, "model.json"), "w") as fh:
        json.dump({**model, "projections": projections}, fh, indent=1)
    return rows, model


def write_csv(path, rows):
    keys = list(rows[0])
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def make_plots(out, rows, runs, mode, points, fitted, projections, label):
    """speedup, efficiency, breakdown, allreduce (with a fit) and projection PNGs in out;
    returns {name: file}."""
    import matplotlib
    matplotlib.use("Agg")
    figures = Figures(out, rows)
    figures.speedup(mode)
    figures.efficiency(mode)
    figures.breakdown()
    if fitted:
        figures.allreduce_fit(points, fitted)
    figures.projection(projections, mode, label)
    return figures.files


class Figures:
    """The report's plots, one method each; measured points are hollow where oversubscribed."""

    def __init__(self, out, rows):
        import matplotlib.pyplot as plt
        self.plt, self.out, self.rows, self.files = plt, out, rows, {}
        self.ranks = [r["ranks"] for r in rows]
        self.over = [r["oversubscribed"] for r in rows]

    def save(self, fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(self.out, name), dpi=110)
        self.plt.close(fig)
        self.files[name.split(".")[0]] = name

    def mark(self, ax, ys):
        for x, y, o in zip(self.ranks, ys, self.over):
            ax.plot(x, y, "o", color="C0", mfc="white" if o else "C0", ms=7)
        if any(self.over):
            ax.plot([], [], "o", color="C0", mfc="white", label="oversubscribed (ranks > cores)")

    def speedup(self, mode):
        fig, ax = self.plt.subplots(figsize=(6, 4))
        speedups = [r["speedup"] for r in self.rows]
        ax.plot(self.ranks, speedups, "-", color="C0", label="measured")
        self.mark(ax, speedups)
        ax.plot(self.ranks, self.ranks, "--", color="k", label="ideal")
        ax.set(xlabel="MPI ranks", ylabel=f"speedup ({mode} scaling)", xticks=self.ranks,
               title=f"Speedup, {mode} scaling")
        ax.legend()
        ax.grid(alpha=0.3)
        self.save(fig, "speedup.png")

    def efficiency(self, mode):
        fig, ax = self.plt.subplots(figsize=(6, 4))
        eff = [100 * r["efficiency"] for r in self.rows]
        ax.plot(self.ranks, eff, "-", color="C0", label="measured")
        self.mark(ax, eff)
        ax.axhline(100, ls="--", color="k", label="ideal")
        ax.set(xlabel="MPI ranks", ylabel="parallel efficiency (%)", xticks=self.ranks,
               ylim=(0, 110), title=f"Efficiency, {mode} scaling")
        ax.legend(loc="lower left")
        ax.grid(alpha=0.3)
        self.save(fig, "efficiency.png")

    def breakdown(self):
        fig, ax = self.plt.subplots(figsize=(7, 4))
        bottom = np.zeros(len(self.rows))
        labels = [str(r) for r in self.ranks]
        for p in PHASES + ("other",):
            vals = np.array([max(r["step_ms"] - sum(r[f"{q}_ms"] for q in PHASES), 0)
                             if p == "other" else r[f"{p}_ms"] for r in self.rows])
            ax.bar(labels, vals, bottom=bottom, color=COLORS[p], label=p)
            bottom += vals
        ax.set(xlabel="MPI ranks", ylabel="time per step (ms, slowest rank per phase)",
               title="Where a step's time goes")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        self.save(fig, "breakdown.png")

    def allreduce_fit(self, points, fitted):
        fig, ax = self.plt.subplots(figsize=(6, 4))
        for p in sorted({p for _, p, _ in points}):
            pts = sorted((n, t) for n, q, t in points if q == p)
            n = np.array([a for a, _ in pts], float)
            ax.loglog(n, [t * 1e6 for _, t in pts], "o", label=f"measured, {p} ranks")
            grid = np.geomspace(n.min(), n.max(), 50)
            ax.loglog(grid, [perfmodel.allreduce_time(g, p, *fitted) * 1e6 for g in grid], "-",
                      label=f"model, {p} ranks")
        ax.set(xlabel="message size (bytes)", ylabel="Allreduce time (µs)",
               title=f"alpha-beta fit: alpha={fitted[0] * 1e6:.2f} µs, "
                     f"beta={fitted[1] / 1e9:.2f} GB/s")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        self.save(fig, "allreduce.png")

    def projection(self, projections, mode, label):
        fig, ax = self.plt.subplots(figsize=(7.5, 4.5))
        for m, style in (("strong", "-"), ("weak", "--")):
            proj = projections[m]
            ax.semilogx([p for p, _, _ in proj], [100 * e for _, _, e in proj], style, base=2,
                        label=f"model, {m} scaling")
        for x, r in zip(self.ranks, self.rows):
            ax.semilogx(x, 100 * r["efficiency"], "o", base=2, color="k",
                        mfc="white" if r["oversubscribed"] else "k")
        ax.plot([], [], "o", color="k", label=f"measured here ({mode} scaling)")
        if any(self.over):
            ax.plot([], [], "o", color="k", mfc="white", label="measured, oversubscribed")
        ax.set(xlabel="MPI ranks", ylabel="parallel efficiency (%)", ylim=(0, 105),
               title=f"Measured efficiency and the model's projection\nnetwork: {label}")
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3, which="both")
        self.save(fig, "projection.png")


def blas_lines(run):
    """What the bench runs said of the BLAS: library, version, kernel, sgemm peak, any warning."""
    b = run.get("blas")
    if not b:
        return []
    text = (f"BLAS: {b['library']} {b['version']}, kernel {b['architecture']}, measured sgemm "
            f"peak {b['sgemm_peak_gflops']:.0f} GFLOP/s per rank.")
    return [text + (f" **Warning:** {b['warning']}." if b.get("warning") else ""), ""]


def write_markdown(path, title, runs, rows, mode, model, projections, plots):
    base = runs[0]
    lines = [f"# {title}", "",
             f"{mode.capitalize()} scaling of a {'-'.join(map(str, base['layers']))} MLP "
             f"({base['parameters']:,} parameters), "
             + (f"global batch {base['global_batch']}" if mode == "strong"
                else f"{base['batch_per_rank']:g} rows per rank")
             + f", {base['threads']} BLAS thread(s) per rank, {base['mpi_library']}. Step times "
             "are medians over timed steps, phases the slowest rank's.", "", *blas_lines(base),
             "| ranks | nodes | step (ms) | samples/s | speedup | efficiency | comm fraction | "
             "load imbalance | model step (ms) | model error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = " *" if r["oversubscribed"] else ""
        model_cols = (f"{r['model_step_ms']:.2f} | {100 * r['model_error']:+.1f}%"
                      if "model_step_ms" in r else "– | –")
        lines.append(f"| {r['ranks']}{flag} | {r['nodes']} | {r['step_ms']:.2f} | "
                     f"{r['samples_per_s']:,.0f} | {r['speedup']:.2f} | {100 * r['efficiency']:.1f}% | "
                     f"{100 * r['comm_fraction']:.1f}% | {r['load_imbalance']:.2f} | {model_cols} |")
    if any(r["oversubscribed"] for r in rows):
        lines += ["", "\\* oversubscribed: more ranks x threads than cores on the node; these "
                  "points show correctness of the series, not achievable speed."]
    lines += ["", "## Performance model", "",
              "allreduce(n, p) = 2·log2(p)·α + 2·(p−1)/p · n/β;  step(p) = (compute + data per "
              "sample)·rows per rank + optimizer + allreduce(gradient, p)", "",
              f"- compute + data per sample: {model['per_sample_s'] * 1e6:.2f} µs; optimizer per "
              f"step: {model['fixed_s'] * 1e3:.3f} ms; gradient: {model['gradient_bytes']:,} bytes"]
    if "fitted_alpha" in model:
        e = model["allreduce_fit_error"]
        used = sorted({r["ranks"] for r in fit_runs(runs)})
        lines.append(f"- fitted to the measured Allreduce times on {', '.join(map(str, used))} "
                     "ranks (oversubscribed runs left out when others exist): α = "
                     f"{model['fitted_alpha'] * 1e6:.2f} µs, β = {model['fitted_beta'] / 1e9:.2f} "
                     f"GB/s; relative error on those points: median {100 * e['median_abs']:.1f}%, "
                     f"max {100 * e['max_abs']:.1f}%; on the measured step times: see the table")
    lines += [f"- projection for: {model['network']} (α = {model['alpha'] * 1e6:.2f} µs, β = "
              f"{model['beta'] / 1e9:.2f} GB/s)", "",
              "| ranks | strong: step (ms) | strong efficiency | weak: step (ms) | weak efficiency |",
              "|---|---|---|---|---|"]
    for (p, ts, es), (_, tw, ew) in zip(projections["strong"], projections["weak"]):
        if p < min(perfmodel.PROJECT_RANKS):
            continue
        lines.append(f"| {p} | {ts * 1e3:.3f} | {100 * es:.1f}% | {tw * 1e3:.3f} | {100 * ew:.1f}% |")
    lines += ["", "## Plots", ""]
    for name, file in plots.items():
        lines.append(f"![{name}]({file})")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def run(cfg, explicit, comm=None):
    rows, model = build(cfg)
    log = Log()
    log.info(f"mpinn report: {len(rows)} runs, {model['mode']} scaling -> "
             f"{os.path.join(cfg.out, 'report.md')}")
    for r in rows:
        log.info(f"  {r['ranks']:>5} ranks: {r['step_ms']:8.2f} ms/step, speedup {r['speedup']:.2f}, "
                 f"efficiency {100 * r['efficiency']:.1f}%" + (" (oversubscribed)"
                                                               if r["oversubscribed"] else ""))
    if "fitted_alpha" in model:
        log.info(f"  alpha {model['fitted_alpha'] * 1e6:.2f} us, beta "
                 f"{model['fitted_beta'] / 1e9:.2f} GB/s (fit error median "
                 f"{100 * model['allreduce_fit_error']['median_abs']:.1f}%)")
    return model
