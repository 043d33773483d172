"""`mpinn export`: a checkpoint's network for use elsewhere.

--format onnx    an ONNX model (the `onnx` package): input "x" (N x F float32), output "y":
                 class probabilities (softmax) for cross-entropy networks, out_act(z) for mse,
                 the same numbers `mpinn predict` writes
--format torch   a state dict for torch.nn.Sequential(Linear, activation, ..., Linear[, Sigmoid])
--format npz     W0, b0, W1, b1, ... (W is fan_in x fan_out: h = act(h @ W + b)) and the sizes
"""

import numpy as np

from .. import checkpoint
from ..errors import UsageError
from ..log import Log
from ..model import layer_views
from ..outputs import check_output_path, written_whole

ONNX_ACT = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}
TORCH_ACT = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid"}


def to_onnx(ckpt, path):
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise UsageError("--format onnx needs the onnx package: pip install onnx") from None
    arch = ckpt.arch
    nodes, inits, h = [], [], "x"
    for l, (W, b) in enumerate(layer_views(arch, ckpt.params)):
        inits += [numpy_helper.from_array(np.ascontiguousarray(W), f"W{l}"),
                  numpy_helper.from_array(np.ascontiguousarray(b), f"b{l}")]
        nodes += [helper.make_node("MatMul", [h, f"W{l}"], [f"m{l}"]),
                  helper.make_node("Add", [f"m{l}", f"b{l}"], [f"z{l}"])]
        h = f"z{l}"
        last = l == arch.n_layers - 1
        act = ("softmax" if arch.loss_fn.integer_labels else arch.output_activation) if last \
            else arch.activation
        if act == "softmax":
            nodes.append(helper.make_node("Softmax", [h], [f"a{l}"], axis=1))
            h = f"a{l}"
        elif act != "identity":
            nodes.append(helper.make_node(ONNX_ACT[act], [h], [f"a{l}"]))
            h = f"a{l}"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mpinn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", arch.sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", arch.sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="mpinn")
    onnx.checker.check_model(model)
    onnx.save(model, path)


def torch_layers(arch):
    """The torch.nn.Sequential layer list (names) matching the checkpoint, for the README."""
    out = []
    for l, (fi, fo) in enumerate(zip(arch.sizes[:-1], arch.sizes[1:])):
        out.append(f"Linear({fi}, {fo})")
        last = l == arch.n_layers - 1
        act = arch.output_activation if last else arch.activation
        if act != "identity" and not (last and arch.loss_fn.integer_labels):
            out.append(f"{TORCH_ACT[act]}()")
    return out


def to_torch(ckpt, path):
    try:
        import torch
    except ImportError:
        raise UsageError("--format torch needs PyTorch: pip install torch") from None
    linear_at = [i for i, m in enumerate(torch_layers(ckpt.arch)) if m.startswith("Linear")]
    state = {}
    for i, (W, b) in zip(linear_at, layer_views(ckpt.arch, ckpt.params)):
        state[f"{i}.weight"] = torch.tensor(np.ascontiguousarray(W.T))  # Linear keeps out x in
        state[f"{i}.bias"] = torch.tensor(np.array(b))
    torch.save(state, path)


def to_npz(ckpt, path):
    arrays = {}
    for l, (W, b) in enumerate(layer_views(ckpt.arch, ckpt.params)):
        arrays[f"W{l}"], arrays[f"b{l}"] = W, b
    with open(path, "wb") as fh:  # a file object: np.savez would add .npz to a name without it
        np.savez(fh, sizes=np.array(ckpt.arch.sizes), activation=ckpt.arch.activation,
                 output_activation=ckpt.arch.output_activation, loss=ckpt.arch.loss, **arrays)


def run(cfg, explicit, comm=None):
    ckpt = checkpoint.load(cfg.checkpoint)
    check_output_path(cfg.out, overwrite=cfg.overwrite)
    with written_whole(cfg.out) as tmp:
        {"onnx": to_onnx, "torch": to_torch, "npz": to_npz}[cfg.format](ckpt, tmp)
    log = Log()
    log.info(f"wrote {cfg.format} model {ckpt.arch.describe()} to {cfg.out}")
    if cfg.format == "torch":
        log.info("load it with: model = torch.nn.Sequential(" + ", ".join(
            f"torch.nn.{m}" for m in torch_layers(ckpt.arch)) + f"); model.load_state_dict("
            f"torch.load({cfg.out!r}))")
