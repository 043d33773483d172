"""The performance model of a data-parallel step, pure functions of measured numbers.

One level (p ranks on one link of latency alpha, bandwidth beta):

    allreduce(n bytes, p) = 2*log2(p)*alpha + 2*(p-1)/p * n/beta        (latency + bandwidth term)

Two levels (N nodes of r ranks each, ranks placed node by node): the reduction moves its bytes
inside each node over shared memory, and between nodes each node's NIC carries 2(N-1)/N * n — the
bytes of one rank per node, whether a hierarchical reduction sends them from a leader or a
recursive-halving Allreduce sends n/r from each of the r ranks, which then share the NIC
(beta_eff = beta_nic / r). MPICH's Allreduce behaves so (the two-node harness's measurement is in
docs/performance.md):

    allreduce2(n, N, r) = allreduce(n, r; intra) + allreduce(n, N; inter)
    step = (compute + data per sample) * rows per rank + optimizer (/p when sharded) + allreduce2

The sharded optimizer (ZeRO-1) moves the same bytes (Reduce_scatter + Allgather) and divides the
update by p. alpha and beta are fitted to measured Allreduce times (beta from the largest messages,
alpha from the smallest; see _fit), intra-node terms on one-node runs, inter-node terms
on multi-node runs; or taken from an interconnect preset. Strong scaling keeps the global batch,
weak scaling the batch per rank.
"""
import math
from collections import namedtuple

import numpy as np

from ..errors import UsageError

Link = namedtuple("Link", "alpha beta")  # seconds, bytes/s

# typical MPI latency and per-NIC bandwidth of common interconnects
NETWORKS = {
    "infiniband-ndr": Link(1.0e-6, 50e9),
    "infiniband-hdr": Link(1.5e-6, 25e9),
    "infiniband-edr": Link(2.0e-6, 12.5e9),
    "slingshot-11": Link(2.0e-6, 25e9),
    "omni-path": Link(2.0e-6, 12.5e9),
    "ethernet-100g": Link(10e-6, 12.5e9),
    "ethernet-25g": Link(15e-6, 3.125e9),
    "ethernet-10g": Link(25e-6, 1.25e9),
}
PROJECTED_NETWORKS = ("infiniband-hdr", "ethernet-100g", "ethernet-25g")
PROJECT_RANKS = [2 ** k for k in range(3, 13)]  # 8 ... 4096


def allreduce_time(n_bytes, ranks, alpha, beta):
    if ranks <= 1:
        return 0.0
    return 2 * math.log2(ranks) * alpha + 2 * (ranks - 1) / ranks * n_bytes / beta


def two_level_allreduce(n_bytes, nodes, per_node, intra, inter):
    """Allreduce of n bytes over `nodes` nodes of `per_node` ranks: intra and inter are Links
    (either may be None where that level has one member)."""
    t = 0.0
    if per_node > 1:
        t += allreduce_time(n_bytes, per_node, *intra)
    if nodes > 1:
        t += allreduce_time(n_bytes, nodes, *inter)
    return t


def _fit(rows, targets, times, sizes):
    """rows . (alpha, 1/beta) = targets -> Link. With a sweep of sizes (Hockney's way): beta from
    the large messages (the three largest sizes, x4 apart), alpha from the small ones (4 KiB and
    below), so mid-size messages that a link's burst allowance or a protocol switch speeds up do
    not bend the bandwidth that gradient-sized messages see. Otherwise least squares on the
    relative error."""
    rows, targets, sizes = np.array(rows, float), np.array(targets, float), np.array(sizes)
    large, small = sizes >= sizes.max() / 16, sizes <= 4096
    if len(set(sizes[large])) >= 2 and small.any() and not (large & small).any():
        alpha, inv_beta = float(np.median(targets[small] / rows[small, 0])), 0.0
        for _ in range(20):  # each term taken off the other's points; settles in a few rounds
            inv_beta = float(np.median((targets[large] - alpha * rows[large, 0]) / rows[large, 1]))
            alpha = float(np.median((targets[small] - inv_beta * rows[small, 1]) / rows[small, 0]))
        if alpha > 0 and inv_beta > 0:
            return Link(alpha, 1 / inv_beta)
    times = np.array(times, float)
    A, y = rows / times[:, None], targets / times
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    alpha, inv_beta = coef
    if inv_beta <= 0:  # bandwidth term not resolved: fit the latency alone
        inv_beta = 1e-12
    if alpha <= 0:
        alpha = 1e-9
        inv_beta = float(np.linalg.lstsq(A[:, 1:], y, rcond=None)[0][0])
    return Link(float(alpha), float(1 / inv_beta))


def fit_alpha_beta(points):
    """points: [(bytes, ranks, seconds)] with ranks > 1 -> Link(alpha, beta), minimising the
    squared relative error of the one-level model."""
    pts = [(n, p, t) for n, p, t in points if p > 1 and t > 0]
    if len({(n, p) for n, p, _ in pts}) < 2:
        raise UsageError("the alpha-beta fit needs Allreduce times at 2 or more message sizes on 2 "
                         "or more ranks (run bench with --allreduce-sweep on > 1 rank)")
    rows = [(2 * math.log2(p), 2 * (p - 1) / p * n) for n, p, _ in pts]
    return _fit(rows, [t for *_, t in pts], [t for *_, t in pts], [n for n, *_ in pts])


def fit_two_level(points):
    """points: [(bytes, nodes, per_node, seconds)] -> (intra, inter) Links, each None when no
    measured point resolves it: intra from one-node runs, inter from multi-node runs with the
    intra-node share (known from the first fit) taken off."""
    one = [(n, r, t) for n, N, r, t in points if N == 1 and r > 1 and t > 0]
    intra = fit_alpha_beta(one) if len({(n, r) for n, r, _ in one}) >= 2 else None
    multi = [(n, N, r, t) for n, N, r, t in points if N > 1 and t > 0 and (r == 1 or intra)]
    inter = None
    if len({(n, N, r) for n, N, r, _ in multi}) >= 2:
        rows = [(2 * math.log2(N), 2 * (N - 1) / N * n) for n, N, r, _ in multi]
        rest = [t - two_level_allreduce(n, 1, r, intra, None) for n, N, r, t in multi]
        inter = _fit(rows, rest, [t for *_, t in multi], [n for n, *_ in multi])
    return intra, inter


def network(name=None, alpha=None, beta=None, fitted=None):
    """(label, Link) from explicit values, a preset name, or 'measured' (the fitted Link)."""
    if alpha is not None or beta is not None:
        if alpha is None or beta is None or alpha <= 0 or beta <= 0:
            raise UsageError("--alpha and --beta go together and must be positive")
        return f"alpha={alpha:g} s, beta={beta:g} B/s", Link(alpha, beta)
    if name in (None, "", "measured"):
        if fitted is None:
            raise UsageError("no measured Allreduce times to fit: name a --network "
                             f"({', '.join(NETWORKS)}) or give --alpha and --beta")
        return "measured", Link(*fitted)
    if name not in NETWORKS:
        raise UsageError(f"unknown --network {name!r}; expected measured or one of "
                         f"{', '.join(NETWORKS)}")
    return name, NETWORKS[name]


class StepModel:
    """A step's time from its calibrated parts: compute + data per sample (s) and the replicated
    optimizer's time per step (s), each as measured with r ranks sharing one node ({r: seconds}:
    ranks on a node share its memory bandwidth), the gradient's bytes, and the intra-node Link
    (None: not measured)."""

    def __init__(self, per_sample_s, optimizer_s, grad_bytes, intra=None):
        self.per_sample = per_sample_s if isinstance(per_sample_s, dict) else {1: per_sample_s}
        self.optimizer = optimizer_s if isinstance(optimizer_s, dict) else {1: optimizer_s}
        self.grad_bytes, self.intra = grad_bytes, intra

    def _at(self, table, per_node):
        """The figure measured with per_node ranks on a node, else with the most below it."""
        return table[max(r for r in table if r <= per_node) if min(table) <= per_node
                     else min(table)]

    def step(self, rows_per_rank, nodes, per_node, inter, shard=False):
        ranks = nodes * per_node
        optimizer = self._at(self.optimizer, per_node)
        return (self._at(self.per_sample, per_node) * rows_per_rank
                + (optimizer / ranks if shard else optimizer)
                + two_level_allreduce(self.grad_bytes, nodes, per_node, self.intra, inter))

    def project(self, mode, batch, inter, per_node=1, shard=False, ranks=PROJECT_RANKS):
        """[(ranks, step seconds, efficiency)]: strong keeps `batch` global, weak keeps it per
        rank; ranks fill nodes of `per_node` ranks each."""
        if per_node > 1 and self.intra is None:
            raise UsageError("a projection with several ranks per node needs the intra-node "
                             "Allreduce measured (a one-node run on 2 or more ranks)")
        t1 = self.step(batch, 1, 1, inter)
        out = []
        for p in ranks:
            r = min(p, per_node)
            rows = batch / p if mode == "strong" else batch
            t = self.step(rows, max(p // r, 1), r, inter, shard)
            out.append((p, t, t1 / (p * t) if mode == "strong" else t1 / t))
        return out
