"""Does a communication thread make overlap work? The scaling issue's third way to overlap the
gradient sum with the backward pass (after per-bucket Iallreduce and MPICH's progress thread): the
backward pass runs bucket by bucket (last layers first, kernels release the GIL), and a thread of
this rank sums each finished bucket with MPI while the next is computed.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        .venv/bin/python benchmarks/comm_thread.py [RATE ...]

Runs the mnist-like network (784-512-512-10, 128 rows per rank, 0.5 MB buckets) on 2 ranks of one
node, then on 2 nodes x 1 rank joined by a shaped link at each RATE (tests/twonodes; needs root),
and prints the median step (ms) of each way, alternated:
  after      one blocking Allreduce of the whole gradient after the backward pass (no overlap)
  iallreduce per-bucket Iallreduce started during the backward pass, Waitall at its end
             (today's --overlap-mb)
  thread     per-bucket blocking Allreduce in a communication thread
  thread+poll  per-bucket Iallreduce in a communication thread that tests it and sleeps between
             tests (MPICH spins inside a blocking call: this thread leaves the core to compute)
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "twonodes"))
from cluster import TwoNodes, unavailable  # noqa: E402

WAYS = ("after", "iallreduce", "thread", "thread+poll")
PROGRAM = '''
import json, queue, statistics, sys, threading, time
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401
from threadpoolctl import threadpool_limits
from mpi4py import MPI
from mpinn.data_parallel import gradient_buckets
from mpinn.model import Architecture, Network, init_params
threadpool_limits(1)
world = MPI.COMM_WORLD
arch = Architecture((784, 512, 512, 10))
rows, n = 128, arch.n_params
buf = np.zeros(n + 3, np.float32)
net = Network(arch, init_params(arch, 0), rows, grads=buf[:n])
rng = np.random.default_rng(world.rank)
x = rng.random((rows, 784), dtype=np.float32)
y = rng.integers(0, 10, rows)
buckets = gradient_buckets(arch, 0.5 * 2**20)
work = queue.SimpleQueue()
done = queue.SimpleQueue()


def communicator():
    while True:
        item = work.get()
        if item is None:
            return
        way, a, b = item
        if way == "thread":
            world.Allreduce(MPI.IN_PLACE, buf[a:b])
        else:
            req = world.Iallreduce(MPI.IN_PLACE, buf[a:b])
            while not req.Test():
                time.sleep(0)  # give the core back between tests
        done.put(b)


thread = threading.Thread(target=communicator, daemon=True)
thread.start()


def step(way):
    net.forward_loss_grad(x, y, 1.0 / (rows * world.size))
    if way == "after":
        net.backward(x)
        world.Allreduce(MPI.IN_PLACE, buf)
        return
    requests = []
    for hi, lo, a, b in buckets:
        net.backward(x, hi, lo)
        if way == "iallreduce":
            requests.append(world.Iallreduce(MPI.IN_PLACE, buf[a:b]))
        else:
            work.put((way, a, b))
    if way == "iallreduce":
        MPI.Request.Waitall(requests)
    else:
        for _ in buckets:
            done.get()


times = {w: [] for w in sys.argv[1].split(",")}
for way in times:
    for _ in range(5):
        step(way)
for _ in range(int(sys.argv[2])):
    for way in times:
        world.Barrier()
        t = []
        for _ in range(int(sys.argv[3])):
            t0 = time.perf_counter()
            step(way)
            t.append(time.perf_counter() - t0)
        times[way].append(statistics.median(t))
work.put(None)
thread.join()
if world.rank == 0:
    print(json.dumps({w: 1e3 * statistics.median(v) for w, v in times.items()}))
'''


def report(where, result):
    base = result["after"]
    print(f"| {where} | " + " | ".join(f"{result[w]:.2f} ({base / result[w]:.2f}x)" for w in WAYS)
          + " |", flush=True)


def main():
    rates = sys.argv[1:] or ["1gbit", "10gbit"]
    print("mnist-like, 128 rows per rank, 0.5 MB buckets; median step ms (speed-up over 'after')\n")
    print("| where | " + " | ".join(WAYS) + " |\n|---|" + "---|" * len(WAYS))
    with tempfile.TemporaryDirectory() as tmp:
        prog = Path(tmp) / "prog.py"
        prog.write_text(PROGRAM)
        argv = [sys.executable, str(prog), ",".join(WAYS), "3", "40"]
        one = subprocess.run([str(Path(sys.executable).parent / "mpiexec"), "-n", "2", *argv],
                             capture_output=True, text=True, timeout=900, cwd=ROOT)
        if one.returncode != 0:
            raise SystemExit(one.stderr[-2000:])
        report("1 node x 2 ranks", json.loads(one.stdout.strip().splitlines()[-1]))
        why = unavailable()
        if why:
            print(f"(two nodes skipped: {why})")
            return
        for rate in rates:
            with TwoNodes(rate=rate) as nodes:
                r = nodes.mpiexec(argv, 2, 1, timeout=900, cwd=ROOT)
                if r.returncode != 0:
                    raise SystemExit(r.stderr[-2000:])
                report(f"2 nodes x 1 rank, {rate}", json.loads(r.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
