"""Run one command across two "nodes" (tests/twonodes/cluster.py), then tear them down.

    .venv/bin/python tests/twonodes/run.py [--rate 1gbit] [--ranks 2] [--per-node 1] -- COMMAND...

e.g. `make two-nodes ARGS="--rate 2gbit -- python -m mpinn bench --steps 20"`. The command's
output is passed through; the exit status is the command's (3 when two nodes cannot be made here).
"""
import argparse
import sys

from cluster import TwoNodes, unavailable


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", default=None, help="link rate for tc tbf, e.g. 1gbit (default: "
                                                     "unshaped)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--per-node", type=int, default=1)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    why = unavailable()
    if why:
        print(f"two-nodes: cannot run here: {why}", file=sys.stderr)
        return 3
    if command[0] == "python":
        command[0] = sys.executable
    with TwoNodes(rate=args.rate) as nodes:
        r = nodes.mpiexec(command, args.ranks, args.per_node, timeout=3600)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
