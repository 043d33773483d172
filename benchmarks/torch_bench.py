"""PyTorch side of the benchmark suite: the same MLP, SGD with momentum, float32, synthetic data in
memory; `--ranks 2` runs DistributedDataParallel over gloo (2 processes on this node).

    python benchmarks/torch_bench.py --sizes 784-512-512-10 --batch 128 --threads 1 [--ranks 2]

Prints one JSON object: median step time (ms) over the timed steps, samples/s (all ranks).
"""
import argparse
import json
import os
import socket
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def model(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def run(rank, args, port, out):
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split("-")]
    if args.ranks > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    torch.manual_seed(0)
    m = model(sizes)
    if args.ranks > 1:
        m = torch.nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, sizes[0])
    y = torch.randint(0, sizes[-1], (args.batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if args.ranks > 1:
            dist.barrier()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    if args.ranks > 1:
        worst = torch.tensor([float(np.median(times))])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        med = float(worst[0])
        dist.barrier()  # nobody tears gloo down while another process still talks to it
        dist.destroy_process_group()
    else:
        med = float(np.median(times))
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"step_ms": med * 1e3, "samples_per_s": args.batch * args.ranks / med,
                       "torch": torch.__version__}, fh)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", required=True)
    p.add_argument("--batch", type=int, required=True, help="rows per rank")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # gone also when a rank fails after writing
        out = os.path.join(tmp, "result.json")
        if args.ranks > 1:
            with socket.socket() as sock:  # a port the OS says is free
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            mp.spawn(run, args=(args, port, out), nprocs=args.ranks, join=True)
        else:
            run(0, args, 0, out)
        with open(out) as fh:
            print(fh.read())


if __name__ == "__main__":
    main()
