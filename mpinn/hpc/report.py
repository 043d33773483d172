"""`mpinn report`: a scaling report from `mpinn bench --json` results (one file per run, from
`mpinn scale` on one node or from separate cluster jobs).

The report folder holds report.md (tables, the two-level alpha-beta model fitted on the runs -
intra-node terms on one-node runs, inter-node terms on multi-node runs - measured against predicted
step times, projections to 8 ... 4096 ranks for named networks with and without the sharded
optimizer), results.csv, model.json, and PNG plots: speedup against ideal, efficiency, a stacked
time breakdown per phase, the Allreduce fit, and measured efficiency together with the projection.
Runs that differ only in ranks x threads at a fixed core count (`mpinn scale --cores`) make a
"mix" report instead: which split of the cores trains fastest.

Speedup and efficiency are relative to the smallest run b (normally 1 rank):
speedup(N) = b * throughput(N) / throughput(b), efficiency = speedup / N, which is t1/(N*tN) for
strong scaling (fixed global batch) and t1/tN for weak scaling (fixed batch per rank).
"""
import csv
import glob
import json
import os

import numpy as np

from ..errors import UsageError
from ..log import Log
from ..outputs import text_written_whole, written_whole
from . import perfmodel

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
    if len({r["threads"] for r in runs}) > 1:
        if len({r["ranks"] * r["threads"] for r in runs}) == 1 and \
                len({r["global_batch"] for r in runs}) == 1:
            return "mix"
        raise UsageError("the runs differ in BLAS threads: a ranks x threads study keeps "
                         "ranks x threads and the global batch fixed (mpinn scale --cores)")
    if len({r["global_batch"] for r in runs}) == 1 and len(runs) > 1:
        return "strong"
    if len({r["batch_per_rank"] for r in runs}) == 1:
        return "weak"
    raise UsageError("the runs keep neither the global batch (strong) nor the batch per rank "
                     "(weak) fixed; say --mode")


def placement(run):
    """(nodes, ranks per node) of a bench result."""
    per_node = run.get("ranks_per_node", run["ranks"])
    return max(run["ranks"] // per_node, 1), per_node


def table(runs):
    """Rows of derived figures per run (relative to the smallest run)."""
    base = runs[0]
    rows = []
    for r in runs:
        speedup = base["ranks"] * r["samples_per_s"] / base["samples_per_s"]
        ph = r["phases_ms"]
        nodes, per_node = placement(r)
        rows.append({
            "ranks": r["ranks"], "nodes": nodes, "ranks_per_node": per_node,
            "threads": r["threads"], "step_ms": r["step_ms"],
            "samples_per_s": r["samples_per_s"], "speedup": speedup,
            "efficiency": speedup / r["ranks"],
            "comm_fraction": ph["allreduce"]["max"] / r["step_ms"],
            "load_imbalance": r.get("load_imbalance", 1.0),
            **{f"{p}_ms": ph[p]["max"] for p in PHASES},
            "oversubscribed": bool(r.get("oversubscribed", False)),
        })
    return rows


def calibrate(runs):
    """The step model: compute + data per sample and optimizer time per step as measured on one
    node with r ranks (each one-node run r that is not oversubscribed, and the smallest run), and
    the gradient's size."""
    per_sample, optimizer = {}, {}
    for r in runs:
        nodes, per_node = placement(r)
        fair = nodes == 1 and per_node not in per_sample and not r.get("oversubscribed")
        if fair or r is runs[0]:
            ph = r["phases_ms"]
            rows = r["global_batch"] / r["ranks"]
            per_sample[per_node] = (ph["compute"]["mean"] + ph["data"]["mean"]) / 1e3 / rows
            optimizer[per_node] = ph["optimizer"]["mean"] / 1e3
    return perfmodel.StepModel(per_sample, optimizer, runs[0]["gradient_bytes"])


def fit_runs(runs):
    """The multi-rank runs whose Allreduce times say something about the network: oversubscribed
    runs (ranks time-share cores) are left out unless there is nothing else."""
    multi = [r for r in runs if r["ranks"] > 1]
    fair = [r for r in multi if not r.get("oversubscribed")]
    return fair or multi


def allreduce_points(runs):
    """(bytes, nodes, ranks per node, seconds) from the sweeps, or from the steps' gradient
    Allreduce."""
    runs = fit_runs(runs)
    pts = [(p["bytes"], *placement(r), p["seconds"]) for r in runs
           for p in r.get("allreduce_sweep", [])]
    if not pts:
        pts = [(r["gradient_bytes"], *placement(r), r["phases_ms"]["allreduce"]["mean"] / 1e3)
               for r in runs if r["ranks"] > 1]
    return pts


def fit_errors(points, intra, inter):
    """{level: (median, max) |relative error|} of the fitted Allreduce model on its points."""
    out = {}
    for level, keep in (("intra", lambda N: N == 1), ("inter", lambda N: N > 1)):
        if (intra, inter)[level == "inter"] is None:
            continue
        errs = [abs(perfmodel.two_level_allreduce(n, N, r, intra, inter) / t - 1)
                for n, N, r, t in points if keep(N)]
        out[level] = {"median_abs": float(np.median(errs)), "max_abs": float(np.max(errs))}
    return out


def predict(rows, runs, model, inter):
    """Each run's step time by the model, where the model knows its levels."""
    for row, r in zip(rows, runs):
        nodes, per_node = placement(r)
        if (per_node > 1 and model.intra is None) or (nodes > 1 and inter is None):
            continue
        pred = model.step(r["global_batch"] / r["ranks"], nodes, per_node, inter,
                          bool(r.get("shard_optimizer")))
        row["model_step_ms"] = pred * 1e3
        row["model_error"] = pred * 1e3 / r["step_ms"] - 1


def projections_for(model, runs, networks, per_node):
    """{network: {strong|weak[_sharded]: [(ranks, step s, efficiency)]}}."""
    base = runs[0]
    out = {}
    for label, link in networks:
        out[label] = {}
        for mode in ("strong", "weak"):
            batch = base["global_batch"] if mode == "strong" else base["batch_per_rank"]
            for shard in (False, True):
                out[label][mode + ("_sharded" if shard else "")] = model.project(
                    mode, batch, link, per_node, shard, [1, 2, 4] + perfmodel.PROJECT_RANKS)
    return out


def build(cfg):
    if os.path.exists(os.path.join(cfg.out, "report.md")) and not cfg.overwrite:
        raise UsageError(f"--out {cfg.out} holds a report (report.md); choose another folder or "
                         "pass --overwrite to replace it")
    runs = load_results(cfg.results)
    mode = cfg.mode if cfg.mode != "auto" else detect_mode(runs)
    rows = table(runs)
    os.makedirs(cfg.out, exist_ok=True)
    if mode == "mix":
        return build_mix(cfg, runs, rows)
    model = calibrate(runs)
    points = allreduce_points(runs)
    model.intra, inter = perfmodel.fit_two_level(points)
    # one-node runs only: the measured "network" is this node's shared memory
    label, link = perfmodel.network(cfg.network, cfg.alpha or None, cfg.beta or None,
                                    inter or model.intra)
    predict(rows, runs, model, inter)
    networks = [(label, link)] + [(n, perfmodel.NETWORKS[n]) for n in perfmodel.PROJECTED_NETWORKS
                                  if n != label]
    projections = projections_for(model, runs, networks, cfg.ranks_per_node)
    info = {"mode": mode, "per_sample_s": model.per_sample, "fixed_s": model.optimizer,
            "gradient_bytes": model.grad_bytes, "network": label, "alpha": link.alpha,
            "beta": link.beta, "ranks_per_node": cfg.ranks_per_node,
            "intra": model.intra and model.intra._asdict(), "inter": inter and inter._asdict(),
            "allreduce_fit_error": fit_errors(points, model.intra, inter)}
    write_csv(os.path.join(cfg.out, "results.csv"), rows)
    plots = make_plots(cfg.out, rows, runs, mode, points, (model.intra, inter), projections[label],
                       label)
    write_markdown(os.path.join(cfg.out, "report.md"), cfg.title, runs, rows, info, projections,
                   plots)
    with text_written_whole(os.path.join(cfg.out, "model.json")) as fh:
        json.dump({**info, "projections": projections}, fh, indent=1)
    return rows, info


def build_mix(cfg, runs, rows):
    """A ranks x threads study at a fixed core count: which mix trains fastest."""
    best = max(rows, key=lambda r: r["samples_per_s"])
    for row in rows:
        row["relative"] = row["samples_per_s"] / best["samples_per_s"]
    write_csv(os.path.join(cfg.out, "results.csv"), rows)
    import matplotlib
    matplotlib.use("Agg")
    figures = Figures(cfg.out, rows)
    figures.breakdown([f"{r['ranks']}x{r['threads']}" for r in rows], "MPI ranks x BLAS threads")
    base = runs[0]
    cores = base["ranks"] * base["threads"]
    lines = [f"# {cfg.title}", "",
             f"Ranks x BLAS threads at {cores} cores: a {'-'.join(map(str, base['layers']))} MLP, "
             f"global batch {base['global_batch']}, {base['mpi_library']}. Step times are medians "
             "over timed steps, phases the slowest rank's.", "", *blas_lines(base),
             "| ranks x threads | step (ms) | samples/s | of the best | compute (ms) | "
             "allreduce (ms) | optimizer (ms) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ranks']} x {r['threads']}{' *' if r['oversubscribed'] else ''} | "
                     f"{r['step_ms']:.2f} | {r['samples_per_s']:,.0f} | {100 * r['relative']:.1f}% "
                     f"| {r['compute_ms']:.2f} | {r['allreduce_ms']:.2f} | "
                     f"{r['optimizer_ms']:.2f} |")
    lines += ["", f"**Best: {best['ranks']} rank(s) x {best['threads']} thread(s)**, "
              f"{best['samples_per_s']:,.0f} samples/s; the slowest mix reaches "
              f"{100 * min(r['relative'] for r in rows):.1f}% of it.", "",
              f"![breakdown]({figures.files['breakdown']})"]
    with text_written_whole(os.path.join(cfg.out, "report.md")) as fh:
        fh.write("\n".join(lines) + "\n")
    info = {"mode": "mix", "best": {"ranks": best["ranks"], "threads": best["threads"],
                                    "samples_per_s": best["samples_per_s"]}}
    with text_written_whole(os.path.join(cfg.out, "model.json")) as fh:
        json.dump(info, fh, indent=1)
    return rows, info


def write_csv(path, rows):
    keys = list(rows[0])
    for row in rows:
        keys += [k for k in row if k not in keys]
    with text_written_whole(path, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def make_plots(out, rows, runs, mode, points, links, projection, label):
    """speedup, efficiency, breakdown, allreduce (with the fit) and projection PNGs in out;
    returns {name: file}."""
    import matplotlib
    matplotlib.use("Agg")
    figures = Figures(out, rows)
    figures.speedup(mode)
    figures.efficiency(mode)
    figures.breakdown([placement_label(r) for r in rows], "MPI ranks (nodes x ranks per node)")
    if any(links):
        figures.allreduce_fit(points, links)
    figures.projection(projection, mode, label)
    return figures.files


def placement_label(row):
    return (f"{row['ranks']}" if row["nodes"] == 1
            else f"{row['ranks']} ({row['nodes']}x{row['ranks_per_node']})")


class Figures:
    """The report's plots, one method each; measured points are hollow where oversubscribed."""

    def __init__(self, out, rows):
        import matplotlib.pyplot as plt
        self.plt, self.out, self.rows, self.files = plt, out, rows, {}
        self.ranks = [r["ranks"] for r in rows]
        self.over = [r["oversubscribed"] for r in rows]

    def save(self, fig, name):
        fig.tight_layout()
        with written_whole(os.path.join(self.out, name)) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
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

    def breakdown(self, labels, xlabel):
        fig, ax = self.plt.subplots(figsize=(7, 4))
        bottom = np.zeros(len(self.rows))
        for p in PHASES + ("other",):
            vals = np.array([max(r["step_ms"] - sum(r[f"{q}_ms"] for q in PHASES), 0)
                             if p == "other" else r[f"{p}_ms"] for r in self.rows])
            ax.bar(labels, vals, bottom=bottom, color=COLORS[p], label=p)
            bottom += vals
        ax.set(xlabel=xlabel, ylabel="time per step (ms, slowest rank per phase)",
               title="Where a step's time goes")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        self.save(fig, "breakdown.png")

    def allreduce_fit(self, points, links):
        fig, ax = self.plt.subplots(figsize=(6, 4))
        for N, r in sorted({(N, r) for _, N, r, _ in points}):
            if (r > 1 and links[0] is None) or (N > 1 and links[1] is None):
                continue
            pts = sorted((n, t) for n, M, q, t in points if (M, q) == (N, r))
            n = np.array([a for a, _ in pts], float)
            where = f"{N} node(s) x {r}"
            line, = ax.loglog(n, [t * 1e6 for _, t in pts], "o", label=f"measured, {where}")
            grid = np.geomspace(n.min(), n.max(), 50)
            ax.loglog(grid, [perfmodel.two_level_allreduce(g, N, r, *links) * 1e6 for g in grid],
                      "-", color=line.get_color(), label=f"model, {where}")
        title = "; ".join(f"{name}: α={link.alpha * 1e6:.2f} µs, β={link.beta / 1e9:.2f} GB/s"
                          for name, link in zip(("intra", "inter"), links) if link)
        ax.set(xlabel="message size (bytes)", ylabel="Allreduce time (µs)", title=title)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
        self.save(fig, "allreduce.png")

    def projection(self, projection, mode, label):
        fig, ax = self.plt.subplots(figsize=(7.5, 4.5))
        for m, style in (("strong", "-"), ("strong_sharded", "-."), ("weak", "--")):
            proj = projection[m]
            ax.semilogx([p for p, _, _ in proj], [100 * e for _, _, e in proj], style, base=2,
                        label=f"model, {m.replace('_', ', ')} scaling")
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


def measured_lines(runs, rows, mode):
    base = runs[0]
    lines = [f"{mode.capitalize()} scaling of a {'-'.join(map(str, base['layers']))} MLP "
             f"({base['parameters']:,} parameters), "
             + (f"global batch {base['global_batch']}" if mode == "strong"
                else f"{base['batch_per_rank']:g} rows per rank")
             + f", {base['threads']} BLAS thread(s) per rank, {base['mpi_library']}. Step times "
             "are medians over timed steps, phases the slowest rank's; the model columns are the "
             "two-level model's prediction of each step (below).", "", *blas_lines(base),
             "| ranks | nodes x ranks per node | step (ms) | samples/s | speedup | efficiency | "
             "comm fraction | load imbalance | model step (ms) | model error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = " *" if r["oversubscribed"] else ""
        model_cols = (f"{r['model_step_ms']:.2f} | {100 * r['model_error']:+.1f}%"
                      if "model_step_ms" in r else "– | –")
        lines.append(f"| {r['ranks']}{flag} | {r['nodes']} x {r['ranks_per_node']} | "
                     f"{r['step_ms']:.2f} | {r['samples_per_s']:,.0f} | {r['speedup']:.2f} | "
                     f"{100 * r['efficiency']:.1f}% | {100 * r['comm_fraction']:.1f}% | "
                     f"{r['load_imbalance']:.2f} | {model_cols} |")
    if any(r["oversubscribed"] for r in rows):
        lines += ["", "\\* oversubscribed: more ranks x threads than cores on the node; these "
                  "points show correctness of the series, not achievable speed."]
    return lines


def model_lines(info):
    lines = ["", "## Performance model", "",
             "allreduce(n, p) = 2·log2(p)·α + 2·(p−1)/p · n/β on one level; with N nodes of r "
             "ranks, allreduce(n, r; intra) + allreduce(n, N; inter): the node's NIC carries "
             "one rank's bytes (a hierarchical reduction, or r ranks at β/r each). step = "
             "(compute + data per sample)·rows per rank + optimizer (÷ p when sharded) + "
             "allreduce(gradient).", "",
             "- compute + data per sample, optimizer per step, measured on one node with r ranks: "
             + "; ".join(f"r = {r}: {info['per_sample_s'][r] * 1e6:.2f} µs, "
                         f"{info['fixed_s'][r] * 1e3:.3f} ms" for r in sorted(info["per_sample_s"]))
             + f"; gradient: {info['gradient_bytes']:,} bytes"]
    for level, where in (("intra", "inside a node (shared memory), fitted on one-node runs"),
                         ("inter", "between nodes, fitted on multi-node runs")):
        link, err = info[level], info["allreduce_fit_error"].get(level)
        if link:
            lines.append(f"- {where}: α = {link['alpha'] * 1e6:.2f} µs, β = "
                         f"{link['beta'] / 1e9:.3f} GB/s; relative error on its Allreduce "
                         f"points: median {100 * err['median_abs']:.1f}%, max "
                         f"{100 * err['max_abs']:.1f}%")
        else:
            lines.append(f"- {where}: not measured")
    return lines


def projection_lines(info, projections):
    r = info["ranks_per_node"]
    names = list(projections)
    lines = ["", f"## Projections ({r} rank(s) per node)", "",
             "The model above with each network's α and β between nodes"
             + (" and this node's shared memory inside one" if r > 1 else "")
             + f"; first column: {info['network']} (α = {info['alpha'] * 1e6:.2f} µs, β = "
             f"{info['beta'] / 1e9:.2f} GB/s). Efficiency without / with --shard-optimizer.", ""]
    for mode in ("strong", "weak"):
        lines += [f"{mode.capitalize()} scaling efficiency:", "",
                  "| ranks | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for i, (p, _, _) in enumerate(projections[names[0]][mode]):
            if p < min(perfmodel.PROJECT_RANKS):
                continue
            cells = [f"{100 * projections[n][mode][i][2]:.1f}% / "
                     f"{100 * projections[n][mode + '_sharded'][i][2]:.1f}%" for n in names]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_markdown(path, title, runs, rows, info, projections, plots):
    lines = [f"# {title}", "", *measured_lines(runs, rows, info["mode"]), *model_lines(info),
             *projection_lines(info, projections), "## Plots", ""]
    for name, file in plots.items():
        lines.append(f"![{name}]({file})")
    with text_written_whole(path) as fh:
        fh.write("\n".join(lines) + "\n")


def run(cfg, explicit, comm=None):
    rows, model = build(cfg)
    log = Log()
    log.info(f"mpinn report: {len(rows)} runs, {model['mode']} -> "
             f"{os.path.join(cfg.out, 'report.md')}")
    for r in rows:
        where = f"{r['ranks']:>5} ranks" if r["nodes"] == 1 else \
            f"{r['ranks']:>5} ranks on {r['nodes']} nodes"
        pred = (f", model {r['model_step_ms']:.2f} ms ({100 * r['model_error']:+.1f}%)"
                if "model_step_ms" in r else "")
        rate = (f"{r['samples_per_s']:,.0f} samples/s" if model["mode"] == "mix" else
                f"speedup {r['speedup']:.2f}, efficiency {100 * r['efficiency']:.1f}%{pred}")
        log.info(f"  {where} x {r['threads']} thread(s): {r['step_ms']:8.2f} ms/step, {rate}"
                 + (" (oversubscribed)" if r["oversubscribed"] else ""))
    if model["mode"] == "mix":
        b = model["best"]
        log.info(f"  best: {b['ranks']} rank(s) x {b['threads']} thread(s)")
    for level in ("intra", "inter"):
        if model.get(level):
            log.info(f"  {level}-node alpha {model[level]['alpha'] * 1e6:.2f} us, beta "
                     f"{model[level]['beta'] / 1e9:.3f} GB/s (fit error median "
                     f"{100 * model['allreduce_fit_error'][level]['median_abs']:.1f}%)")
    return model
