"""`mpinn export`: a checkpoint's network for use elsewhere.

--format onnx    an ONNX model (the `onnx` package): input "x" (N x F float32, or float64 for a
                 --dtype float64 network, as every tensor of its graph), output "y":
                 class probabilities (softmax) for cross-entropy networks, a sigmoid per output
                 for bce, out_act(z) for mse,
                 the same numbers `mpinn predict` writes; a network trained on scaled inputs or
                 targets has the scaling in its graph ((x - offset) / scale first, y * scale +
                 offset last)
--format torch   a state dict for torch.nn.Sequential(Linear, activation, ..., Linear[, Sigmoid])
                 (.double() for a float64 network);
                 the scaling of inputs (and of targets, with an identity output) folded into
                 the first (last) Linear layer, which is exact affine algebra
--format npz     W0, b0, W1, b1, ... (W is fan_in x fan_out: h = act(h @ W + b)), the sizes, and
                 input_offset, input_scale (target_offset, target_scale) of a scaled network
"""

import numpy as np

from .. import checkpoint
from ..errors import UsageError
from ..log import Log
from ..model import layer_views
from ..outputs import check_output_path, written_whole

ONNX_ACT = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "leaky_relu": "LeakyRelu",
            "softplus": "Softplus", "gelu": "Gelu", "gelu_tanh": "Gelu"}  # silu: x * Sigmoid(x)
TORCH_ACT = {"relu": "ReLU()", "tanh": "Tanh()", "sigmoid": "Sigmoid()", "softplus": "Softplus()",
             "gelu": "GELU()", "gelu_tanh": "GELU(approximate='tanh')", "silu": "SiLU()"}
ONNX_OPSET, GELU_OPSET = 17, 20  # Gelu arrived in opset 20; other graphs keep 17


def onnx_activation(onnx, act, slope, h, out, double):
    """(nodes, initializers) computing out = act(h). A float64 graph stays double: LeakyRelu's
    alpha and onnxruntime's Gelu(tanh) are float32 inside, and onnxruntime has no double
    Softplus or Erf, so those are built from elementwise ops (softplus with PyTorch's threshold
    20); gelu's erf alone is taken in float32 (Cast; outputs agree to about 1e-8)."""
    node, const = onnx.helper.make_node, lambda name, v: onnx.numpy_helper.from_array(
        np.array(v, np.float64), f"{out}_{name}")
    if act == "silu":
        return [node("Sigmoid", [h], [f"{out}_gate"]), node("Mul", [h, f"{out}_gate"], [out])], []
    if double and act == "softplus":
        return [node("Exp", [h], [f"{out}_e"]),
                node("Add", [f"{out}_e", f"{out}_one"], [f"{out}_1e"]),
                node("Log", [f"{out}_1e"], [f"{out}_log"]),
                node("Greater", [h, f"{out}_threshold"], [f"{out}_above"]),
                node("Where", [f"{out}_above", h, f"{out}_log"], [out])], [
                    const("one", 1.0), const("threshold", 20.0)]
    if double and act == "gelu":  # x/2 (1 + erf(x / sqrt 2))
        f32, f64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
        return [node("Mul", [h, f"{out}_root"], [f"{out}_u"]),
                node("Cast", [f"{out}_u"], [f"{out}_u32"], to=f32),
                node("Erf", [f"{out}_u32"], [f"{out}_erf32"]),
                node("Cast", [f"{out}_erf32"], [f"{out}_erf"], to=f64),
                node("Add", [f"{out}_erf", f"{out}_one"], [f"{out}_1erf"]),
                node("Mul", [h, f"{out}_1erf"], [f"{out}_x1erf"]),
                node("Mul", [f"{out}_x1erf", f"{out}_half"], [out])], [
                    const("root", 0.7071067811865476), const("one", 1.0), const("half", 0.5)]
    if double and act == "leaky_relu":  # LeakyRelu's alpha is a float32 attribute
        return [node("Greater", [h, f"{out}_zero"], [f"{out}_positive"]),
                node("Mul", [h, f"{out}_slope"], [f"{out}_sloped"]),
                node("Where", [f"{out}_positive", h, f"{out}_sloped"], [out])], [
                    const("zero", 0.0), const("slope", slope)]
    if double and act == "gelu_tanh":  # x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        names = [f"{out}_{k}" for k in ("x2", "x3", "cx3", "inner", "u", "t", "1t", "x1t")]
        return [node("Mul", [h, h], [names[0]]), node("Mul", [names[0], h], [names[1]]),
                node("Mul", [names[1], f"{out}_cubic"], [names[2]]),
                node("Add", [h, names[2]], [names[3]]),
                node("Mul", [names[3], f"{out}_scale"], [names[4]]),
                node("Tanh", [names[4]], [names[5]]),
                node("Add", [names[5], f"{out}_one"], [names[6]]),
                node("Mul", [h, names[6]], [names[7]]),
                node("Mul", [names[7], f"{out}_half"], [out])], [
                    const("cubic", 0.044715), const("scale", 0.7978845608028654),
                    const("one", 1.0), const("half", 0.5)]
    attrs = ({"alpha": slope} if act == "leaky_relu" else
             {"approximate": "tanh"} if act == "gelu_tanh" else {})
    return [node(ONNX_ACT[act], [h], [out], **attrs)], []


def to_onnx(ckpt, path):
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise UsageError("--format onnx needs the onnx package: pip install onnx") from None
    arch, scaling = ckpt.arch, ckpt.scaling
    nodes, inits, h = [], [], "x"
    if scaling.inputs is not None:
        inits += [numpy_helper.from_array(scaling.inputs.offset.astype(arch.float), "x_offset"),
                  numpy_helper.from_array(scaling.inputs.scale.astype(arch.float), "x_scale")]
        nodes += [helper.make_node("Sub", ["x", "x_offset"], ["x_centred"]),
                  helper.make_node("Div", ["x_centred", "x_scale"], ["x_scaled"])]
        h = "x_scaled"
    for l, (W, b) in enumerate(layer_views(arch, ckpt.params)):
        inits += [numpy_helper.from_array(np.ascontiguousarray(W), f"W{l}"),
                  numpy_helper.from_array(np.ascontiguousarray(b), f"b{l}")]
        nodes += [helper.make_node("MatMul", [h, f"W{l}"], [f"m{l}"]),
                  helper.make_node("Add", [f"m{l}", f"b{l}"], [f"z{l}"])]
        h = f"z{l}"
        last = l == arch.n_layers - 1
        act = (output_activation(arch) if last else arch.activation)
        if act == "softmax":
            nodes.append(helper.make_node("Softmax", [h], [f"a{l}"], axis=1))
            h = f"a{l}"
        elif act != "identity":
            more, consts = onnx_activation(onnx, act, arch.slope, h, f"a{l}",
                                           arch.dtype == "float64")
            nodes, inits = nodes + more, inits + consts
            h = f"a{l}"
    if scaling.targets is not None:
        inits += [numpy_helper.from_array(scaling.targets.scale.astype(arch.float), "y_scale"),
                  numpy_helper.from_array(scaling.targets.offset.astype(arch.float), "y_offset")]
        nodes += [helper.make_node("Mul", [h, "y_scale"], ["y_scaled"]),
                  helper.make_node("Add", ["y_scaled", "y_offset"], ["y_units"])]
        h = "y_units"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    elem = TensorProto.DOUBLE if arch.dtype == "float64" else TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "mpinn",
        [helper.make_tensor_value_info("x", elem, ["N", arch.sizes[0]])],
        [helper.make_tensor_value_info("y", elem, ["N", arch.sizes[-1]])],
        inits,
    )
    opset = GELU_OPSET if arch.activation in ("gelu", "gelu_tanh") else ONNX_OPSET
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="mpinn")
    onnx.checker.check_model(model)
    onnx.save(model, path)


def output_activation(arch):
    """What the exported graph ends with: the probabilities predict reports (softmax for
    cross-entropy, a sigmoid per output for bce), else the output activation."""
    return {"cross_entropy": "softmax", "bce": "sigmoid"}.get(arch.loss, arch.output_activation)


def torch_layers(arch):
    """The torch.nn.Sequential layer list (names) matching the checkpoint, for the README."""
    out = []
    for l, (fi, fo) in enumerate(zip(arch.sizes[:-1], arch.sizes[1:])):
        out.append(f"Linear({fi}, {fo})")
        last = l == arch.n_layers - 1
        act = arch.output_activation if last else arch.activation
        if act != "identity" and not (last and arch.loss != "mse"):  # torch's losses take logits
            out.append(f"LeakyReLU({arch.slope!r})" if act == "leaky_relu" else TORCH_ACT[act])
    return out


def to_torch(ckpt, path):
    try:
        import torch
    except ImportError:
        raise UsageError("--format torch needs PyTorch: pip install torch") from None
    linear_at = [i for i, m in enumerate(torch_layers(ckpt.arch)) if m.startswith("Linear")]
    state = {}
    for i, (W, b) in zip(linear_at, folded_layers(ckpt)):
        state[f"{i}.weight"] = torch.tensor(np.ascontiguousarray(W.T))  # Linear keeps out x in
        state[f"{i}.bias"] = torch.tensor(np.array(b))
    torch.save(state, path)


def folded_layers(ckpt):
    """[(W, b)] of the network with its scaling folded in, in float64 then rounded to the
    network's dtype:
    ((x - o) / s) @ W + b = x @ (W / s) + (b - (o / s) @ W) for the inputs, and
    s_y * (h @ W + b) + o_y = h @ (W * s_y) + (b * s_y + o_y) for targets (identity output)."""
    arch, scaling = ckpt.arch, ckpt.scaling
    layers = [(W.astype(np.float64), b.astype(np.float64))
              for W, b in layer_views(arch, ckpt.params)]
    if scaling.inputs is not None:
        o, s = scaling.inputs.offset, scaling.inputs.scale
        W, b = layers[0]
        layers[0] = (W / s[:, None], b - (o / s) @ W)
    if scaling.targets is not None:
        if arch.output_activation != "identity":
            raise UsageError(f"targets scaled behind a {arch.output_activation} output cannot be "
                             "folded into a Linear layer: export --format onnx or npz")
        o, s = scaling.targets.offset, scaling.targets.scale
        W, b = layers[-1]
        layers[-1] = (W * s, b * s + o)
    return [(W.astype(arch.float), b.astype(arch.float)) for W, b in layers]


def to_npz(ckpt, path):
    arrays = {}
    for l, (W, b) in enumerate(layer_views(ckpt.arch, ckpt.params)):
        arrays[f"W{l}"], arrays[f"b{l}"] = W, b
    for name, scale in (("input", ckpt.scaling.inputs), ("target", ckpt.scaling.targets)):
        if scale is not None:
            arrays[f"{name}_offset"], arrays[f"{name}_scale"] = scale.offset, scale.scale
    with open(path, "wb") as fh:  # a file object: np.savez would add .npz to a name without it
        np.savez(fh, sizes=np.array(ckpt.arch.sizes), activation=ckpt.arch.activation,
                 output_activation=ckpt.arch.output_activation, loss=ckpt.arch.loss,
                 leaky_slope=ckpt.arch.slope, **arrays)


def run(cfg, explicit, comm=None):
    ckpt = checkpoint.load(cfg.checkpoint)
    check_output_path(cfg.out, overwrite=cfg.overwrite)
    with written_whole(cfg.out) as tmp:
        {"onnx": to_onnx, "torch": to_torch, "npz": to_npz}[cfg.format](ckpt, tmp)
    log = Log()
    log.info(f"wrote {cfg.format} model {ckpt.arch.describe()} to {cfg.out}")
    if cfg.format == "torch":
        double = ".double()" if ckpt.arch.dtype == "float64" else ""  # else load_state_dict rounds
        log.info("load it with: model = torch.nn.Sequential(" + ", ".join(
            f"torch.nn.{m}" for m in torch_layers(ckpt.arch)) + f"){double}; "
            f"model.load_state_dict(torch.load({cfg.out!r}))")
