"""The performance model of a data-parallel step, pure functions of measured numbers.

    allreduce(n bytes, p ranks) = 2*log2(p)*alpha + 2*(p-1)/p * n/beta     (latency + ring term)
    step(p) = (compute + data per sample) * rows per rank + optimizer + allreduce(gradient, p)

alpha and beta are fitted to measured Allreduce times by least squares on the relative error (so
4-byte and 16-MB messages weigh alike), or taken from an interconnect preset. Strong scaling keeps
the global batch, weak scaling the batch per rank.
"""
import math

import numpy as np

from ..errors import UsageError

# (alpha seconds, beta bytes/s): typical MPI latency and per-link bandwidth of common interconnects.
NETWORKS = {
    "infiniband-ndr": (1.0e-6, 50e9),
    "infiniband-hdr": (1.5e-6, 25e9),
    "infiniband-edr": (2.0e-6, 12.5e9),
    "slingshot-11": (2.0e-6, 25e9),
    "omni-path": (2.0e-6, 12.5e9),
    "ethernet-100g": (10e-6, 12.5e9),
    "ethernet-25g": (15e-6, 3.125e9),
    "ethernet-10g": (25e-6, 1.25e9),
}
PROJECT_RANKS = [2 ** k for k in range(3, 13)]  # 8 ... 4096


def allreduce_time(n_bytes, ranks, alpha, beta):
    if ranks <= 1:
        return 0.0
    return 2 * math.log2(ranks) * alpha + 2 * (ranks - 1) / ranks * n_bytes / beta


def fit_alpha_beta(points):
    """points: [(bytes, ranks, seconds)] with ranks > 1 -> (alpha, beta), minimising the squared
    relative error of the model."""
    pts = [(n, p, t) for n, p, t in points if p > 1 and t > 0]
    if len(pts) < 2:
        raise UsageError("the alpha-beta fit needs Allreduce times at 2 or more message sizes on 2 "
                         "or more ranks (run bench with --allreduce-sweep on > 1 rank)")
    A = np.array([[2 * math.log2(p) / t, 2 * (p - 1) / p * n / t] for n, p, t in pts])
    coef, *_ = np.linalg.lstsq(A, np.ones(len(pts)), rcond=None)
    alpha, inv_beta = coef
    if inv_beta <= 0:  # bandwidth term not resolved: fit the latency alone
        inv_beta = 1e-12
    if alpha <= 0:
        alpha = 1e-9
        inv_beta = float(np.linalg.lstsq(A[:, 1:], np.ones(len(pts)), rcond=None)[0][0])
    return float(alpha), float(1 / inv_beta)


def relative_errors(points, alpha, beta):
    """(model - measured) / measured for each (bytes, ranks, seconds)."""
    return [(allreduce_time(n, p, alpha, beta) - t) / t for n, p, t in points]


def network(name=None, alpha=None, beta=None, fitted=None):
    """(label, alpha, beta) from explicit values, a preset name, or 'measured' (the fit)."""
    if alpha is not None or beta is not None:
        if alpha is None or beta is None or alpha <= 0 or beta <= 0:
            raise UsageError("--alpha and --beta go together and must be positive")
        return f"alpha={alpha:g} s, beta={beta:g} B/s", alpha, beta
    if name in (None, "", "measured"):
        if fitted is None:
            raise UsageError("no measured Allreduce times to fit: name a --network "
                             f"({', '.join(NETWORKS)}) or give --alpha and --beta")
        return "measured (this node)", fitted[0], fitted[1]
    if name not in NETWORKS:
        raise UsageError(f"unknown --network {name!r}; expected measured or one of "
                         f"{', '.join(NETWORKS)}")
    return name, *NETWORKS[name]


def step_time(per_sample_s, rows_per_rank, fixed_s, grad_bytes, ranks, alpha, beta):
    return per_sample_s * rows_per_rank + fixed_s + allreduce_time(grad_bytes, ranks, alpha, beta)


def project(mode, per_sample_s, fixed_s, grad_bytes, batch, alpha, beta, ranks=PROJECT_RANKS):
    """[(ranks, step seconds, efficiency)]: strong keeps `batch` global, weak keeps it per rank."""
    t1 = step_time(per_sample_s, batch, fixed_s, grad_bytes, 1, alpha, beta)
    out = []
    for p in ranks:
        rows = batch / p if mode == "strong" else batch
        t = step_time(per_sample_s, rows, fixed_s, grad_bytes, p, alpha, beta)
        eff = t1 / (p * t) if mode == "strong" else t1 / t
        out.append((p, t, eff))
    return out
