"""A sweep's results: one result.json per trial (written by the trial's first rank when the trial
ends), gathered by rank 0 into OUT/results.csv, OUT/results.md and OUT/results.png."""
import csv
import json
import math
import os

from ..outputs import written_whole
from ..rundir import RunDir

RESULT_NAME = "result.json"
METRICS = ("val_loss", "val_accuracy", "train_loss", "epochs", "seconds")
STATUSES = ("ok", "failed", "stopped")


def trial_dir(out, index):
    return os.path.join(out, f"trial-{index:03d}")


def write_result(out, index, record):
    path = os.path.join(trial_dir(out, index), RESULT_NAME)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with written_whole(path, "result") as tmp:
        with open(tmp, "w") as fh:
            json.dump(record, fh)


def read_result(out, index):
    """The trial's result record, or None when it has not ended (or its record is unreadable)."""
    try:
        with open(os.path.join(trial_dir(out, index), RESULT_NAME)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def finished(record):
    """Failed trials count as finished: they would fail again. Stopped ones continue."""
    return record is not None and record["status"] in ("ok", "failed")


def best(records):
    """The ok trial of lowest validation loss (training loss without validation data)."""
    ok = [r for r in records if r["status"] == "ok"]
    for key in ("val_loss", "train_loss"):
        scored = [r for r in ok if _number(r.get(key)) is not None]
        if scored:
            return min(scored, key=lambda r: r[key]), key
    return None, None


def _number(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def figures(records):
    """METRICS, then the task metrics' headline figures some trial reported (--metrics)."""
    extra = {k for r in records for k in r if k.startswith("val_") and k not in METRICS}
    return [*METRICS, *sorted(extra)]


def rows(records, varied):
    """One dict per trial with the results.csv columns, in trial order."""
    out = []
    for r in records:
        row = {"run_dir": r["run_dir"], **{k: r["options"].get(k, "") for k in varied}}
        row.update({k: r.get(k, "") if r.get(k) is not None else "" for k in figures(records)})
        row.update(status=r["status"], reason=r.get("reason", ""))
        out.append(row)
    return out


def write_all(out, records, varied, wall_seconds):
    """results.csv, results.md and results.png from the trials' records; -> (best record, key)."""
    table = rows(records, varied)
    columns = ["run_dir", *varied, *figures(records), "status", "reason"]
    with written_whole(os.path.join(out, "results.csv"), "results.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, columns)
            writer.writeheader()
            writer.writerows(table)
    top, key = best(records)
    plotted = plot(out, records, varied)
    with written_whole(os.path.join(out, "results.md"), "results.md") as tmp:
        with open(tmp, "w") as fh:
            fh.write(markdown(table, columns, records, top, key, wall_seconds, plotted))
    return top, key


def markdown(table, columns, records, top, key, wall_seconds, plotted):
    counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    lines = ["# mpinn sweep results", "",
             f"{len(records)} trials: {counts['ok']} ok, {counts['failed']} failed, "
             f"{counts['stopped']} stopped; wall time {wall_seconds:.1f} s, "
             f"{sum(r.get('seconds') or 0 for r in records):.1f} s of trial time in all.", ""]
    if top is not None:
        lines += [f"Best: `{top['run_dir']}` with {key} {top[key]:.4f} "
                  f"({' '.join(f'{k}={v}' for k, v in top['options'].items())}).", ""]
    order = sorted(range(len(table)), key=lambda i: (
        records[i]["status"] != "ok", _number(records[i].get(key or "val_loss")) or math.inf))
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for i in order:
        lines.append("| " + " | ".join(_cell(table[i][c]) for c in columns) + " |")
    if plotted:
        lines += ["", f"![validation loss against each varied option, and learning curves]"
                      f"({plotted})"]
    return "\n".join(lines) + "\n"


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def learning_curve(run_dir):
    """[(epoch, validation loss)] from a trial's metrics.jsonl."""
    points = []
    try:
        with open(RunDir(run_dir).metrics) as fh:
            for line in fh:
                record = json.loads(line)
                if record.get("kind") == "epoch" and record.get("val_loss") is not None:
                    points.append((record["epoch"], record["val_loss"]))
    except (OSError, ValueError):
        pass
    return points


def plot(out, records, varied):
    """results.png: validation loss against each varied option, and every trial's learning
    curve. Returns the file name, or None when no trial has a validation loss."""
    fig = figure(records, varied)
    if fig is None:
        return None
    import matplotlib.pyplot as plt
    with written_whole(os.path.join(out, "results.png"), "results.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return "results.png"


def natural(value):
    """A sort key that orders numbers and comma-separated sizes by value ("32" before "128,64"),
    text after them."""
    try:
        return (0, tuple(float(p) for p in str(value).split(",")), "")
    except ValueError:
        return (1, (), str(value))


def trial_label(record, varied):
    """A learning curve's legend: the options that differ between trials."""
    options = record.get("options", {})
    return ", ".join(f"{k}={options.get(k)}" for k in varied) or os.path.basename(
        record["run_dir"])


def figure(records, varied):
    """The sweep's matplotlib figure (None when no trial has a validation loss): a numeric option
    spanning a decade or more on a log axis, sizes and other values in their natural order, the
    learning curves labelled by their options."""
    scored = [r for r in records if r["status"] == "ok" and _number(r.get("val_loss")) is not None]
    if not scored:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(varied) + 1, figsize=(4 * (len(varied) + 1), 3.4),
                             squeeze=False)
    for ax, name in zip(axes[0], varied):
        values = [r["options"].get(name) for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            ax.plot(values, [r["val_loss"] for r in scored], "o")
            if min(values) > 0 and max(values) >= 10 * min(values):  # a decade or more
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values}, key=natural)
            ax.plot([labels.index(str(v)) for v in values], [r["val_loss"] for r in scored], "o")
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set_xlabel(name)
        ax.set_ylabel("validation loss")
    curves = axes[0][-1]
    for r in records:
        points = learning_curve(r["run_dir"])
        if points:
            curves.plot(*zip(*points), label=trial_label(r, varied))
    curves.set_xlabel("epoch")
    curves.set_ylabel("validation loss")
    if len(records) <= 12:
        curves.legend(fontsize=7)
    fig.tight_layout()
    return fig
