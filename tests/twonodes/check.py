"""`make two-nodes-check`: does the scaling report's two-level model predict steps across a link?

For each link rate (1 and 2 Gbit/s by default) it brings two "nodes" up (cluster.py), runs
`mpinn scale --mode weak --ranks 1x1,1x2,2x1,2x2` across them (one node: 1 and 2 ranks over shared
memory; two nodes: 1 and 2 ranks per node over the shaped link), and reads the report: the model's
intra-node terms come from the one-node runs, its inter-node terms from the two-node runs' Allreduce
sweeps, and each run's predicted step is compared with the measured one. Prints a table of
measured against predicted per rate, writes it to OUT/summary.md (each rate's full report in
OUT/<rate>/), and exits 1 when any prediction misses by more than --tolerance.

    .venv/bin/python tests/twonodes/check.py [--rates 1gbit,2gbit] [--out DIR] [--tolerance 0.15]
"""
import argparse
import csv
import os
import shlex
import subprocess
import sys
import tempfile

from cluster import TwoNodes, unavailable

SERIES = "1x1,1x2,2x1,2x2"


def scale_across(nodes, out, args):
    launcher = shlex.join(nodes.command([], "{n}", "{ppn}"))
    cmd = [sys.executable, "-m", "mpinn", "scale", "--mode", "weak", "--ranks", SERIES,
           "--features", "784", "--hidden", "512,512", "--batch-per-rank", str(args.batch_per_rank),
           "--steps", str(args.steps), "--launcher", launcher,
           "--out", out, "--title", f"two nodes, {nodes.rate} link", "--timeout", "900"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"two-nodes-check: mpinn scale failed (exit {r.returncode}):\n{r.stderr}")
    with open(os.path.join(out, "results.csv")) as fh:
        return list(csv.DictReader(fh))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="1gbit,2gbit")
    parser.add_argument("--out", default=None, help="results folder (default: a new temporary one)")
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--batch-per-rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    why = unavailable()
    if why:
        print(f"two-nodes-check: cannot run here: {why}", file=sys.stderr)
        return 3
    out = args.out or tempfile.mkdtemp(prefix="mpinn-two-nodes-check-")
    if os.path.exists(os.path.join(out, "summary.md")):
        print(f"two-nodes-check: {out} holds a check (summary.md); choose another --out",
              file=sys.stderr)
        return 2
    lines = ["| link | nodes x ranks per node | measured step (ms) | model step (ms) | error |",
             "|---|---|---|---|---|"]
    misses = []
    for rate in args.rates.split(","):
        with TwoNodes(rate=rate) as nodes:
            rows = scale_across(nodes, os.path.join(out, rate), args)
        for row in rows:
            error = float(row["model_error"])
            where = f"{row['nodes']} x {row['ranks_per_node']}"
            shared = row["oversubscribed"] == "True"
            lines.append(f"| {rate} | {where}{' *' if shared else ''} | "
                         f"{float(row['step_ms']):.2f} | {float(row['model_step_ms']):.2f} | "
                         f"{100 * error:+.1f}% |")
            if abs(error) > args.tolerance and not shared:
                misses.append(f"{rate} {where}: {100 * error:+.1f}%")

    if any(" * |" in line for line in lines):
        lines += ["", "\\* oversubscribed: the two nodes share this machine's cores, and these "
                  "runs have more ranks than it has; the model describes separate nodes, so their "
                  "error is shown, not judged."]
    judged = sum(1 for line in lines[2:] if line.startswith("| ") and " * |" not in line)
    verdict = (f"all {judged} predictions within {100 * args.tolerance:.0f}%" if not misses
               else f"missed by more than {100 * args.tolerance:.0f}%: {'; '.join(misses)}")
    text = "\n".join(lines + ["", verdict])
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)
    print(f"reports: {out}/<rate>/report.md")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
