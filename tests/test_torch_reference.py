"""mpinn against PyTorch, an implementation that shares no code with it.

1. Forward, loss and backward of every hidden activation x loss (and output activation), in
   float64 (agreement to rounding: rtol 1e-10) and float32 (rtol 2e-5: float32 has a unit roundoff
   of 6e-8 and these sums run over at most a few dozen terms).
2. Training end to end through `mpinn train` under `mpiexec` (the trainings of one rank count run in
   one launch, one after another, through the command's own entry point): every optimizer option
   (SGD, weight decay, momentum, Nesterov, Adam with its betas and eps) and the three losses (bce
   with a pos_weight per output, multi-label), at 1 and 3
   ranks data parallel and on 3 pipeline stages, against torch.optim in float64 from the same
   initial weights (given to mpinn with --init) over the same batches. mpinn computes in float32, so
   the two drift apart by float32 rounding only: about 1e-6 relative per step; after 8 steps we
   allow rtol 2e-5 plus atol 2e-6 (for weights near zero). A wrong scale, a missed rank or a mis-
   ordered batch moves weights by 1e-3 or more.
"""
import dataclasses
import itertools
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers import ok, run_many
from mpinn import checkpoint
from mpinn.model import Architecture, Network
from reference import PaperTrustOptimizer

torch.set_num_threads(1)
LEAKY_SLOPE = 0.2  # --leaky-slope of the leaky_relu networks here (PyTorch's default: 0.01)
TORCH_ACT = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
             "identity": lambda z: z,
             "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, LEAKY_SLOPE),
             "softplus": torch.nn.functional.softplus, "gelu": torch.nn.functional.gelu,
             "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
             "silu": torch.nn.functional.silu}
HIDDEN_ACTS = ("relu", "tanh", "sigmoid", "leaky_relu", "softplus", "gelu", "gelu_tanh", "silu")


def torch_layers(flat, sizes):
    """(W, b) float64 leaf tensors (W of shape (fan_in, fan_out)) from a flat mpinn buffer."""
    layers, o = [], 0
    for fi, fo in zip(sizes[:-1], sizes[1:]):
        W = torch.tensor(np.array(flat[o:o + fi * fo], np.float64).reshape(fi, fo),
                         requires_grad=True)
        o += fi * fo
        b = torch.tensor(np.array(flat[o:o + fo], np.float64), requires_grad=True)
        o += fo
        layers.append((W, b))
    return layers


def torch_forward(layers, x, act, out_act):
    h = torch.as_tensor(x, dtype=torch.float64)
    for i, (W, b) in enumerate(layers):
        h = TORCH_ACT[out_act if i == len(layers) - 1 else act](h @ W + b)
    return h


def torch_loss(out, y, loss, pos_weight=(), class_weight=(), rows_weight=None):
    """torch's loss; with rows_weight (each row's own weight) the mean of the rows' losses
    weighted by it (and by their class weights), over those weights."""
    F_ = torch.nn.functional
    if loss == "cross_entropy":
        weight = torch.tensor(class_weight, dtype=torch.float64) if class_weight else None
        if rows_weight is None:
            return F_.cross_entropy(out, torch.as_tensor(y), weight=weight)
        per_row = F_.cross_entropy(out, torch.as_tensor(y), weight=weight, reduction="none")
        w = torch.as_tensor(rows_weight, dtype=torch.float64)
        by_class = weight[torch.as_tensor(y)] if weight is not None else 1.0
        return (w * per_row).sum() / (w * by_class).sum()
    target = torch.as_tensor(y, dtype=torch.float64)
    if loss == "bce":
        weight = torch.tensor(pos_weight, dtype=torch.float64) if pos_weight else None
        per = F_.binary_cross_entropy_with_logits(out, target, pos_weight=weight,
                                                  reduction="none")
    else:
        per = F_.mse_loss(out, target, reduction="none")
    if rows_weight is None:
        return per.mean()
    w = torch.as_tensor(rows_weight, dtype=torch.float64)
    return (w[:, None] * per).sum() / (w.sum() * per.shape[1])


def flat_grads(layers):
    return np.concatenate([np.concatenate([W.grad.numpy().ravel(), b.grad.numpy()])
                           for W, b in layers])


def flat_params(layers):
    return np.concatenate([np.concatenate([W.detach().numpy().ravel(), b.detach().numpy()])
                           for W, b in layers])


LOSSES = [("cross_entropy", "identity"), ("mse", "identity"), ("mse", "sigmoid"),
          ("bce", "identity")]
POS_WEIGHT = (0.5, 2.0, 3.0, 1.0)  # bce's weights of positive targets, one per output


@pytest.mark.parametrize("act,loss_out", list(itertools.product(HIDDEN_ACTS, LOSSES)))
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 2e-5)])
def test_forward_loss_backward_match_torch(act, loss_out, dtype, rtol):
    loss, out_act = loss_out
    rng = np.random.default_rng(11)
    sizes = (5, 9, 7, 4)
    n = 13
    x = rng.normal(size=(n, sizes[0])).astype(dtype)
    y = (rng.integers(0, sizes[-1], n) if loss == "cross_entropy"
         else rng.integers(0, 2, (n, sizes[-1])).astype(dtype) if loss == "bce"
         else rng.uniform(0, 1, (n, sizes[-1])).astype(dtype))
    pos_weight = POS_WEIGHT if loss == "bce" else ()
    arch = Architecture(sizes, act, out_act, loss, pos_weight, (), LEAKY_SLOPE)
    flat = rng.normal(0, 0.6, arch.n_params).astype(dtype)
    net = Network(arch, flat.copy(), n)

    layers = torch_layers(flat, sizes)
    out = torch_forward(layers, x, act, out_act)
    value = torch_loss(out, y, loss, pos_weight)
    value.backward()

    per = n if loss == "cross_entropy" else n * sizes[-1]
    loss_sum, correct = net.train_step(x, y, 1.0 / per)
    assert loss_sum / per == pytest.approx(value.item(), rel=rtol)
    np.testing.assert_allclose(net.grads, flat_grads(layers), rtol=rtol, atol=rtol * 1e-2)
    expect = out.detach()
    if loss == "cross_entropy":
        expect = torch.softmax(expect, 1)
        assert correct == int((out.argmax(1).numpy() == y).sum())
    elif loss == "bce":  # accuracy: rows whose every label is right
        expect = torch.sigmoid(expect)
        assert correct == int(((expect.numpy() > 0.5) == (y > 0.5)).all(1).sum())
    np.testing.assert_allclose(net.forward(x), expect.numpy(), rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 2e-5)])
def test_class_weighted_cross_entropy_matches_torch(dtype, rtol):
    """The loss is the weighted mean, sum(w[y] l) / sum(w[y]): the step's scale is 1 / sum(w[y])."""
    rng = np.random.default_rng(12)
    sizes, n, weight = (5, 8, 3), 17, (0.25, 3.0, 1.0)
    x = rng.normal(size=(n, sizes[0])).astype(dtype)
    y = rng.integers(0, 3, n)
    arch = Architecture(sizes, "tanh", "identity", "cross_entropy", (), weight)
    flat = rng.normal(0, 0.6, arch.n_params).astype(dtype)
    net = Network(arch, flat.copy(), n)
    layers = torch_layers(flat, sizes)
    value = torch_loss(torch_forward(layers, x, "tanh", "identity"), y, "cross_entropy",
                       class_weight=weight)
    value.backward()
    total = float(np.sum(np.array(weight)[y]))
    loss_sum, _ = net.train_step(x, y, 1.0 / total)
    assert loss_sum / total == pytest.approx(value.item(), rel=rtol)
    np.testing.assert_allclose(net.grads, flat_grads(layers), rtol=rtol, atol=rtol * 1e-2)


# -- training end to end --------------------------------------------------------------------------
N, F, HIDDEN, K, BATCH, STEPS = 45, 5, (7, 6), 3, 12, 8   # 4 steps an epoch, the last of 9 rows

OPTIMIZERS = {
    "sgd": (["--optimizer", "sgd", "--lr", "0.2"], dict(name="sgd", lr=0.2)),
    "sgd-decay": (["--optimizer", "sgd", "--lr", "0.2", "--weight-decay", "0.05"],
                  dict(name="sgd", lr=0.2, weight_decay=0.05)),
    "momentum": (["--optimizer", "momentum", "--lr", "0.1", "--momentum", "0.8"],
                 dict(name="sgd", lr=0.1, momentum=0.8)),
    "nesterov": (["--optimizer", "momentum", "--lr", "0.1", "--momentum", "0.7", "--nesterov",
                  "--weight-decay", "0.03"],
                 dict(name="sgd", lr=0.1, momentum=0.7, nesterov=True, weight_decay=0.03)),
    "adam": (["--optimizer", "adam", "--lr", "0.02", "--beta1", "0.8", "--beta2", "0.95",
              "--eps", "1e-4", "--weight-decay", "0.01"],
             dict(name="adam", lr=0.02, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.01)),
    "adamw": (["--optimizer", "adamw", "--lr", "0.02", "--beta1", "0.8", "--eps", "1e-4",
               "--weight-decay", "0.1"],
              dict(name="adamw", lr=0.02, betas=(0.8, 0.999), eps=1e-4, weight_decay=0.1)),
    "rmsprop": (["--optimizer", "rmsprop", "--lr", "0.01", "--alpha", "0.9", "--weight-decay",
                 "0.02"], dict(name="rmsprop", lr=0.01, alpha=0.9, weight_decay=0.02)),
    # no torch.optim rule: the papers' equations in float64 (reference.PaperTrustOptimizer)
    "lamb": (["--optimizer", "lamb", "--lr", "0.05", "--beta2", "0.99", "--weight-decay", "0.01",
              "--trust-clip", "2"],
             dict(name="lamb", lr=0.05, beta2=0.99, weight_decay=0.01, trust_clip=2.0)),
    "lars": (["--optimizer", "lars", "--lr", "2", "--momentum", "0.8", "--weight-decay", "0.001",
              "--trust-coefficient", "0.05"],
             dict(name="lars", lr=2.0, momentum=0.8, weight_decay=0.001, trust_coefficient=0.05)),
}
TORCH_RULES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
               "rmsprop": torch.optim.RMSprop, "sgd": torch.optim.SGD}
# (loss, hidden activation, output activation): cross-entropy with tanh, mse with a sigmoid output
NETS = {"ce": ("cross_entropy", "tanh", "identity"), "mse": ("mse", "relu", "sigmoid"),
        "bce": ("bce", "tanh", "identity"), "weighted": ("cross_entropy", "relu", "identity"),
        "rows-ce": ("cross_entropy", "tanh", "identity"), "rows-mse": ("mse", "relu", "identity"),
        "leaky": ("cross_entropy", "leaky_relu", "identity"),
        "softplus": ("mse", "softplus", "identity"), "gelu": ("cross_entropy", "gelu", "identity"),
        "gelu_tanh": ("mse", "gelu_tanh", "sigmoid"), "silu": ("bce", "silu", "identity")}
# --dtype float64, from float64 initial weights: mpinn equals torch's float64 to rounding
CASES64 = [("ce", "adam"), ("bce", "nesterov"), ("gelu", "lamb")]
# the rows' own weights (--weight-key w), with class weights for rows-ce
ROWS_WEIGHTED = {"rows-ce": "ce.h5", "rows-mse": "mse.h5"}
BCE_POS_WEIGHT = (1.5, 4.0, 0.5)  # multi-label, K = 3: torch's BCEWithLogitsLoss(pos_weight)
CLASS_WEIGHT = (0.5, 2.0, 1.25)   # torch's CrossEntropyLoss(weight=...): a mean over the weights
CASES = [(net, opt) for opt in OPTIMIZERS for net in ("ce",)] + [
    ("mse", "adam"), ("mse", "nesterov"), ("bce", "adam"), ("bce", "momentum"),
    ("weighted", "sgd"), ("weighted", "adam"), ("rows-ce", "adam"), ("rows-mse", "momentum"),
    ("leaky", "momentum"), ("softplus", "adam"), ("gelu", "adamw"), ("gelu_tanh", "momentum"),
    ("silu", "adam")]
LAYOUTS = {"1 rank": (1, []), "3 ranks": (3, []),
           "3 stages": (3, ["--pipeline-stages", 3, "--micro-batches", 2])}
DROPOUT_LAYOUTS = {**LAYOUTS, "2 ranks": (2, []), "accumulate": (2, ["--accumulate", 3])}


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """Data files (one per loss) and an initial checkpoint per network, in a temporary folder."""
    tmp = tmp_path_factory.mktemp("ref")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(N, F)).astype(np.float32)
    files = {}
    with h5py.File(tmp / "ce.h5", "w") as f:
        f["X"], f["y"] = x, rng.integers(0, K, N)
    with h5py.File(tmp / "mse.h5", "w") as f:
        f["X"], f["y"] = x, rng.uniform(0, 1, (N, K)).astype(np.float32)
    with h5py.File(tmp / "weighted.h5", "w") as f:  # a rare class: batches of unequal weight
        f["X"], f["y"] = x, rng.choice(K, N, p=[0.6, 0.15, 0.25])
    with h5py.File(tmp / "bce.h5", "w") as f:
        f["X"], f["y"] = x, (rng.uniform(0, 1, (N, K)) < [0.2, 0.5, 0.7]).astype(np.int8)
    row_weights = rng.uniform(0, 3, N) * (rng.uniform(size=N) > 0.1)  # a tenth weigh 0
    for name, source in ROWS_WEIGHTED.items():
        with h5py.File(tmp / source) as f, h5py.File(tmp / f"{name}.h5", "w") as g:
            g["X"], g["y"], g["w"] = f["X"][...], f["y"][...], row_weights
    shutil.copy(tmp / "ce.h5", tmp / "leaky.h5")
    for copy, source in (("leaky", "ce"), ("softplus", "mse"), ("gelu", "ce"), ("gelu_tanh", "mse"),
                         ("silu", "bce")):
        shutil.copy(tmp / f"{source}.h5", tmp / f"{copy}.h5")
    for name, (loss, act, out_act) in NETS.items():
        arch = Architecture((F,) + HIDDEN + (K,), act, out_act, loss,
                            BCE_POS_WEIGHT if loss == "bce" else (),
                            CLASS_WEIGHT if name in ("weighted", "rows-ce") else (), LEAKY_SLOPE)
        params = rng.normal(0, 0.5, arch.n_params).astype(np.float32)
        checkpoint.save(str(tmp / f"init-{name}.h5"), checkpoint.Checkpoint(arch, params))
        files[name] = (str(tmp / f"{name}.h5"), str(tmp / f"init-{name}.h5"), arch, params)
    for name in {net for net, _ in CASES64}:
        arch = dataclasses.replace(files[name][2], dtype="float64")
        params = rng.normal(0, 0.5, arch.n_params)  # float64 weights, not rounded to float32
        checkpoint.save(str(tmp / f"init-{name}-64.h5"), checkpoint.Checkpoint(arch, params))
        files[name, "float64"] = (files[name][0], str(tmp / f"init-{name}-64.h5"), arch, params)
    return files


def torch_training(data_path, arch, params, opt, clip=0.0, scheduler=None):
    """The same 8 steps in float64 PyTorch: global batch k is rows [12k, 12k+12) in file order;
    optionally torch's clip_grad_norm_ after backward and a torch scheduler after each step."""
    with h5py.File(data_path, "r") as f:
        x, y = f["X"][...], f["y"][...]
        w = f["w"][...].astype(np.float64) if "w" in f else None
    layers = torch_layers(params, arch.sizes)
    tensors = [t for layer in layers for t in layer]
    kw = dict(opt)
    name = kw.pop("name")
    if name in TORCH_RULES:
        optimizer = TORCH_RULES[name](tensors, **kw)
    else:
        optimizer = PaperStep(tensors, PaperTrustOptimizer(name, **kw))
    sched = scheduler(optimizer) if scheduler else None
    for step in range(STEPS):
        k = step % -(-N // BATCH)
        rows = slice(k * BATCH, min((k + 1) * BATCH, N))
        optimizer.zero_grad()
        out = torch_forward(layers, x[rows], arch.activation, arch.output_activation)
        torch_loss(out, y[rows], arch.loss, arch.pos_weight, arch.class_weight,
                   None if w is None else w[rows]).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(tensors, clip)
        optimizer.step()
        if sched:
            sched.step()
    return flat_params(layers)


class PaperStep:
    """LARS or LAMB from reference.PaperTrustOptimizer on torch's float64 tensors: each layer's W
    adapted, its bias not."""

    def __init__(self, tensors, rule):
        self.tensors, self.rule = tensors, rule
        self.adapt = [t.dim() == 2 for t in tensors]

    def zero_grad(self):
        for t in self.tensors:
            t.grad = None

    def step(self):
        new = self.rule.step([t.detach().numpy().copy() for t in self.tensors],
                             [t.grad.numpy() for t in self.tensors], self.adapt)
        with torch.no_grad():
            for t, w in zip(self.tensors, new):
                t.copy_(torch.from_numpy(w))


def training_jobs(problem, root):
    """Every training of the tests below, {key: (ranks, argv)}: run together by the `trained`
    fixture, one launch per rank count."""
    jobs = {}

    def job(key, ranks, *argv, run_of=None):
        """run_of: the key of another job whose run folder this one continues."""
        run_dir = root / "-".join(map(str, run_of or key))
        jobs[key] = (ranks, ["train", *argv, "--run-dir", run_dir])

    for (net, opt), layout in itertools.product(CASES, LAYOUTS):
        ranks, extra = LAYOUTS[layout]
        job(("train", net, opt, layout), ranks, "--data", problem[net][0], "--init",
            problem[net][1], "--batch-size", BATCH, "--steps", STEPS, "--epochs", 10,
            "--no-shuffle", "--check-every", 1, "--log-every", 100, *OPTIMIZERS[opt][0], *extra,
            *(["--weight-key", "w"] if net in ROWS_WEIGHTED else []))
    data_path, init = problem["ce"][:2]
    for case, layout in itertools.product(SCHEDULED, LAYOUTS):
        ranks, extra = LAYOUTS[layout]
        job(("scheduled", case, layout), ranks, "--data", data_path, "--init", init,
            "--batch-size", BATCH, "--steps", STEPS, "--epochs", 10, "--no-shuffle",
            "--log-every", 100, "--optimizer", "momentum", "--lr", "0.2", "--momentum", "0.8",
            *SCHEDULED[case][0], *extra)
    for ranks in (1, 2, 3):
        job(("accumulate", ranks), ranks, "--data", data_path, "--init", init,
            "--batch-size", BATCH, "--steps", STEPS, "--epochs", 10, "--no-shuffle",
            "--log-every", 100, "--accumulate", 3, *OPTIMIZERS["nesterov"][0])
    data_path, init = problem["mse"][:2]
    for layout, (ranks, extra) in DROPOUT_LAYOUTS.items():
        args = ["--data", data_path, "--init", init, "--batch-size", BATCH, "--steps", STEPS,
                "--epochs", 10, "--shuffle", "none" if "--pipeline-stages" in extra else "global",
                "--log-every", 100, "--dropout", "0.3", *OPTIMIZERS["adam"][0]]
        job(("dropout", layout, "one"), 1, *args)
        job(("dropout", layout, "many"), ranks, *args, *extra)
    # gelu_tanh's derivative needs z, which a stage's last hidden layer keeps for the gradient
    # the next stage sends back (kernels.output_act_grad_): 1 rank against 3 stages
    data_path, init = problem["gelu_tanh"][:2]
    args = ["--data", data_path, "--init", init, "--batch-size", BATCH, "--steps", STEPS,
            "--epochs", 10, "--shuffle", "none", "--log-every", 100, "--dropout", "0.3",
            *OPTIMIZERS["adam"][0]]
    job(("dropout", "gelu_tanh", "one"), 1, *args)
    job(("dropout", "gelu_tanh", "many"), 3, *args, *LAYOUTS["3 stages"][1])
    float64_jobs(problem, job)
    return jobs


REFUSED = {  # jobs that must end in this one error (their Run, not a folder, is kept)
    ("float64", "resumed as float64"): "--dtype 'float64' differs from the run's 'float32'",
    ("float64", "float32 --init"): "--dtype float64 conflicts with the checkpoint's float32"}


def float64_jobs(problem, job):
    for (net, opt), layout in itertools.product(CASES64, LAYOUTS):
        ranks, extra = LAYOUTS[layout]
        data_path, init = problem[net, "float64"][:2]
        job(("float64", net, opt, layout), ranks, "--data", data_path, "--init", init,
            "--dtype", "float64", "--batch-size", BATCH, "--steps", STEPS, "--epochs", 10,
            "--no-shuffle", "--log-every", 100, *OPTIMIZERS[opt][0], *extra)
    # a float32 network does not become float64 on the way: resumed, or as --init
    data_path, init = problem["ce"][:2]
    job(("float64", "a float32 run"), 1, "--data", data_path, "--steps", 2)
    job(("float64", "resumed as float64"), 1, "--data", data_path, "--epochs", 2, "--resume",
        "--dtype", "float64", run_of=("float64", "a float32 run"))
    job(("float64", "float32 --init"), 1, "--data", data_path, "--init", init, "--dtype",
        "float64")


@pytest.fixture(scope="module")
def trained(problem, tmp_path_factory):
    """key -> the run folder of that training, each checked to have ended well."""
    root = tmp_path_factory.mktemp("trained")
    jobs = training_jobs(problem, root)
    runs = run_many(jobs, root)
    return {key: runs[key] if key in REFUSED else (ok(runs[key]), Path(argv[-1]))[1]
            for key, (_, argv) in jobs.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("net,opt", CASES)
def test_training_matches_torch(problem, trained, net, opt, layout):
    data_path, init, arch, params = problem[net]
    got = checkpoint.load(str(trained["train", net, opt, layout] / "checkpoint.h5"))
    assert got.global_step == STEPS and got.arch == arch
    expect = torch_training(data_path, arch, params, OPTIMIZERS[opt][1])
    assert not np.allclose(expect, params, atol=1e-3)  # training moved the weights
    np.testing.assert_allclose(got.params, expect, rtol=2e-5, atol=2e-6)


# -- schedules, the scaling rule and clipping, end to end -----------------------------------------
def warmup_then(optimizer, warmup, after):
    """torch's own pieces: LinearLR from lr/W to lr over W updates, then `after`."""
    S = torch.optim.lr_scheduler
    return S.SequentialLR(optimizer, [S.LinearLR(optimizer, 1 / warmup, 1.0, warmup - 1), after],
                          [warmup])


SCHEDULED = {
    # mpinn options -> (torch learning rate, torch scheduler factory, clip)
    "cosine, warm-up, clipping": (
        ["--lr-schedule", "cosine", "--warmup-steps", 3, "--min-lr", "0.01",
         "--clip-grad-norm", "0.3"], 0.2,
        lambda o: warmup_then(o, 3, torch.optim.lr_scheduler.CosineAnnealingLR(o, 5, 0.01)), 0.3),
    "clipping above the gradient norm": (  # torch leaves such gradients alone; so must mpinn
        ["--clip-grad-norm", "50"], 0.2, None, 50.0),
    "step, linear scaling": (
        ["--lr-schedule", "step", "--step-size", 3, "--gamma", "0.5", "--lr-scale", "linear",
         "--lr-ref-batch", 24], 0.1,  # 0.2 x 12/24
        lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5), 0.0),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(SCHEDULED))
def test_schedules_and_clipping_match_torch(problem, trained, case, layout):
    data_path, init, arch, params = problem["ce"]
    args, torch_lr, scheduler, clip = SCHEDULED[case]
    got = checkpoint.load(str(trained["scheduled", case, layout] / "checkpoint.h5"))
    expect = torch_training(data_path, arch, params, dict(name="sgd", lr=torch_lr, momentum=0.8),
                            clip, scheduler)
    np.testing.assert_allclose(got.params, expect, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["constant", "step", "cosine"])
@pytest.mark.parametrize("warmup", [0, 4])
def test_learning_rates_match_torch_schedulers(kind, warmup):
    from mpinn.lr import lr_at
    S = torch.optim.lr_scheduler
    total, base = 30, 0.5
    o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    after = {"constant": lambda: S.ConstantLR(o, 1.0, 0),
             "step": lambda: S.StepLR(o, 7, 0.3),
             "cosine": lambda: S.CosineAnnealingLR(o, total - warmup, 0.05)}[kind]()
    sched = warmup_then(o, warmup, after) if warmup else after
    expect = []
    for _ in range(total):
        expect.append(o.param_groups[0]["lr"])
        o.step()
        sched.step()
    got = [lr_at(t, base, kind, warmup, total, 0.05, 7, 0.3) for t in range(total)]
    np.testing.assert_allclose(got, expect, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_accumulation_matches_torch_full_batches(problem, trained, ranks):
    """Each rank's share in 3 pieces, gradients summed: torch's update of the whole batch."""
    data_path, init, arch, params = problem["ce"]
    got = checkpoint.load(str(trained["accumulate", ranks] / "checkpoint.h5"))
    expect = torch_training(data_path, arch, params, OPTIMIZERS["nesterov"][1])
    np.testing.assert_allclose(got.params, expect, rtol=2e-5, atol=2e-6)


# -- dropout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("act,loss_out", list(itertools.product(HIDDEN_ACTS, LOSSES[:2])))
def test_dropout_forward_backward_match_torch(act, loss_out):
    """mpinn's masks (kernels.dropout_mask) applied in torch as h = act(z) * mask / (1 - p)."""
    from mpinn import kernels
    from mpinn.model import Dropout
    loss, out_act = loss_out
    rng = np.random.default_rng(12)
    sizes, n, p = (5, 9, 7, 4), 13, 0.4
    x = rng.normal(size=(n, sizes[0]))
    y = rng.integers(0, 4, n) if loss == "cross_entropy" else rng.uniform(0, 1, (n, 4))
    arch = Architecture(sizes, act, out_act, loss, slope=LEAKY_SLOPE)
    flat = rng.normal(0, 0.6, arch.n_params)
    rows = rng.permutation(1000)[:n].astype(np.int64)  # file rows of this batch
    drop = Dropout(p, seed=3).for_update(17)
    net = Network(arch, flat.copy(), n)
    per = n if loss == "cross_entropy" else n * 4
    loss_sum, _ = net.train_step(x, y, 1.0 / per, None, drop, rows)

    layers = torch_layers(flat, sizes)
    h, unit = torch.as_tensor(x), sizes[0]
    for i, (W, b) in enumerate(layers):
        h = TORCH_ACT[out_act if i == len(layers) - 1 else act](h @ W + b)
        if i < len(layers) - 1:
            mask = kernels.dropout_mask(drop, rows, unit, sizes[i + 1])
            assert 0 < mask.sum() < mask.size
            h = h * torch.as_tensor(mask, dtype=torch.float64) / (1 - p)
            unit += sizes[i + 1]
    value = torch_loss(h, y, loss)
    value.backward()
    assert loss_sum / per == pytest.approx(value.item(), rel=1e-10)
    np.testing.assert_allclose(net.grads, flat_grads(layers), rtol=1e-9, atol=1e-12)


def test_dropout_masks_are_keyed_and_fair():
    from mpinn import kernels
    from mpinn.model import Dropout
    rows = np.arange(2000, dtype=np.int64)
    d = Dropout(0.25, seed=1)
    a = kernels.dropout_mask(d.for_update(5), rows, 100, 50)
    assert abs(a.mean() - 0.75) < 0.01                                     # keeps 1 - p
    np.testing.assert_array_equal(a, kernels.dropout_mask(d.for_update(5), rows, 100, 50))
    for other in (kernels.dropout_mask(d.for_update(6), rows, 100, 50),    # another update
                  kernels.dropout_mask(d.for_update(5), rows + 1, 100, 50),  # other rows
                  kernels.dropout_mask(d.for_update(5), rows, 101, 50),    # other units
                  kernels.dropout_mask(Dropout(0.25, 2).for_update(5), rows, 100, 50)):
        assert 0.6 < (a == other).mean() < 0.7  # independent: agree on 0.75^2 + 0.25^2 = 62.5%
    # a row's mask does not depend on which other rows share its batch
    np.testing.assert_array_equal(a[7:9], kernels.dropout_mask(d.for_update(5), rows[7:9], 100, 50))


@pytest.mark.parametrize("layout", list(DROPOUT_LAYOUTS) + ["gelu_tanh"])
def test_dropout_is_the_same_on_any_layout(problem, trained, layout):
    data_path, init, arch, params = problem["gelu_tanh" if layout == "gelu_tanh" else "mse"]
    one = checkpoint.load(str(trained["dropout", layout, "one"] / "checkpoint.h5")).params
    many = checkpoint.load(str(trained["dropout", layout, "many"] / "checkpoint.h5")).params
    np.testing.assert_allclose(many, one, rtol=1e-4, atol=1e-6)
    assert not np.allclose(one, params, atol=1e-3)


# -- float64 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("net,opt", CASES64)
def test_float64_training_matches_torch_to_rounding(problem, trained, net, opt, layout):
    """Kernels, buffers, the gradient sum (node shared memory at 3 ranks), the optimizer, the
    pipeline's messages and the checkpoint all in float64: 8 steps agree with torch's float64
    to 1e-12 (float32 would be 1e-6 away)."""
    data_path, init, arch, params = problem[net, "float64"]
    got = checkpoint.load(str(trained["float64", net, opt, layout] / "checkpoint.h5"))
    assert got.arch == arch and got.params.dtype == np.float64
    assert all(s.dtype == np.float64 for s in got.optimizer_state)
    expect = torch_training(data_path, arch, params, OPTIMIZERS[opt][1])
    assert not np.allclose(expect, params, atol=1e-3)
    np.testing.assert_allclose(got.params, expect, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("key", list(REFUSED), ids=lambda key: key[1])
def test_a_float32_network_is_not_trained_on_in_float64(trained, key):
    run = trained[key]
    errors = [line for line in run.stderr.splitlines() if line.startswith("mpinn: error")]
    assert run.returncode == 2 and len(errors) == 1 and REFUSED[key] in errors[0], run.stderr
