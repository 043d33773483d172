"""What a slow link between nodes teaches: gradient overlap, the sharded optimizer and a
hierarchical reduction, each against the plain step, across two "nodes" of this machine
(tests/twonodes: network namespaces joined by a shaped veth link, UCX over TCP).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        .venv/bin/python benchmarks/slow_link.py [RATE] [REPEATS]

For 2 nodes x 1 rank and 2 nodes x 2 ranks at RATE (default 1gbit) it runs `mpinn bench` on the
mnist-like network (784-512-512-10, 128 rows per rank) REPEATS times (default 2) alternately in
each setting, and prints the median step time and its ratio to the default step (with one rank
per node the default is MPI's Allreduce: there is no node to share). A hierarchical
reduction (Reduce inside each node, Allreduce among the nodes' first ranks, Bcast inside) is timed
against MPICH's own Allreduce of the same 2.7 MB gradient in one standalone MPI program. Needs root
(network namespaces).
"""
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "twonodes"))
from cluster import TwoNodes, unavailable  # noqa: E402

BENCH = ["-m", "mpinn", "bench", "--features", "784", "--hidden", "512,512", "--batch-per-rank",
         "128", "--steps", "30", "--warmup", "5", "--json"]
SETTINGS = {
    "default: the node's shared memory, slices Allreduced between nodes": ([], {}),
    "--allreduce mpi: one MPI Allreduce after backward": (["--allreduce", "mpi"], {}),
    "--overlap-mb 0.5 (Iallreduce per bucket)": (["--overlap-mb", "0.5"], {}),
    "--overlap-mb 0.5 + MPICH async progress thread": (
        ["--overlap-mb", "0.5"], {"MPIR_CVAR_ASYNC_PROGRESS": "1"}),
    "--shard-optimizer": (["--shard-optimizer"], {}),
}
HIERARCHICAL = '''
import sys, time, numpy as np
from mpi4py import MPI
world = MPI.COMM_WORLD
node = world.Split_type(MPI.COMM_TYPE_SHARED)
leaders = world.Split(0 if node.rank == 0 else MPI.UNDEFINED, world.rank)
buf = np.ones(int(sys.argv[1]) // 4, np.float32)
def flat():
    world.Allreduce(MPI.IN_PLACE, buf)
def hierarchical():
    node.Reduce(MPI.IN_PLACE if node.rank == 0 else buf, buf if node.rank == 0 else None, root=0)
    if node.rank == 0:
        leaders.Allreduce(MPI.IN_PLACE, buf)
    node.Bcast(buf, root=0)
out = {}
for name, fn in (("flat", flat), ("hierarchical", hierarchical)) * 2:
    times = []
    for _ in range(15):
        world.Barrier(); t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    out.setdefault(name, []).append(float(np.median(times[3:])))
if world.rank == 0:
    print(" | ".join(f"{k} {1e3 * min(v):.2f} ms" for k, v in out.items()))
'''


def bench(nodes, ranks, per_node, args, env):
    r = nodes.mpiexec([sys.executable, *BENCH, *args], ranks, per_node, env=env, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"bench failed: {r.stderr.strip()[-400:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["step_ms"]


def main():
    rate = sys.argv[1] if len(sys.argv) > 1 else "1gbit"
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    why = unavailable()
    if why:
        raise SystemExit(f"slow_link: cannot run here: {why}")
    print(f"Two nodes joined by a {rate} link; mnist-like, 128 rows per rank; step ms "
          f"(median of {repeats}, settings alternated) and its ratio to the default\n")
    print(
        "| setting | 2 nodes x 1 rank | ratio | 2 nodes x 2 ranks | ratio |\n|---|---|---|---|---|"
    )
    with TwoNodes(rate=rate) as nodes, tempfile.TemporaryDirectory() as tmp:
        times = {name: {1: [], 2: []} for name in SETTINGS}
        for _ in range(repeats):
            for per_node in (1, 2):
                for name, (args, env) in SETTINGS.items():
                    times[name][per_node].append(bench(nodes, 2 * per_node, per_node, args, env))
        plain = {k: statistics.median(v) for k, v in times[next(iter(SETTINGS))].items()}
        for name in SETTINGS:
            cells = []
            for per_node in (1, 2):
                t = statistics.median(times[name][per_node])
                cells += [f"{t:.2f}", f"{plain[per_node] / t:.2f}x"]
            print(f"| {name} | " + " | ".join(cells) + " |")
        script = Path(tmp) / "hierarchical.py"
        script.write_text(HIERARCHICAL)
        r = nodes.mpiexec([sys.executable, str(script), "2678824"], 4, 2, timeout=600)
        print(f"\nAllreduce of the 2.7 MB gradient, 2 nodes x 2 ranks (median of 12, best of 2): "
              f"{r.stdout.strip() or r.stderr.strip()[-300:]}")


if __name__ == "__main__":
    main()
