"""Tiny ONNX generators that meet the model contract, built with the onnx helper API (no PyTorch).

`centre_crop`: image = the centre of the mask window, so a render must reproduce the mask's colours exactly
wherever the geometry is right. `context_mix`: the crop plus a share of the window's mean colour, so
overlapping patches disagree near their edges and the blend window, batching and resume are all visible in
the output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime we support
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _io(window: int, patch: int, batch="N"):
    return (
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, [batch, 3, window, window]),
        helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, patch, patch]),
    )


def _crop_nodes(margin: int, patch: int, out: str):
    consts = [
        numpy_helper.from_array(np.array([margin, margin], np.int64), "starts"),
        numpy_helper.from_array(np.array([margin + patch, margin + patch], np.int64), "ends"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
    ]
    return [helper.make_node("Slice", ["mask", "starts", "ends", "axes"], [out])], consts


def centre_crop(path: Path, patch: int = 256, margin: int = 20, batch="N") -> Path:
    nodes, consts = _crop_nodes(margin, patch, "image")
    mask, image = _io(patch + 2 * margin, patch, batch)
    return _save(helper.make_graph(nodes, "centre_crop", [mask], [image], initializer=consts), path)


def context_mix(path: Path, patch: int = 256, margin: int = 20, share: float = 0.3) -> Path:
    nodes, consts = _crop_nodes(margin, patch, "crop")
    consts += [
        numpy_helper.from_array(np.array(1 - share, np.float32), "keep"),
        numpy_helper.from_array(np.array(share, np.float32), "share"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", ["mask"], ["mean"]),
        helper.make_node("Mul", ["crop", "keep"], ["crop_part"]),
        helper.make_node("Mul", ["mean", "share"], ["mean_part"]),
        helper.make_node("Add", ["crop_part", "mean_part"], ["image"]),
    ]
    mask, image = _io(patch + 2 * margin, patch)
    return _save(helper.make_graph(nodes, "context_mix", [mask], [image], initializer=consts), path)


def bright_edges(path: Path, edge: int = 8, patch: int = 256, margin: int = 20) -> Path:
    """The centre crop, but white (+1) on the outermost `edge` rows and columns of every patch: a generator that draws
    its patch edges badly, which only the pixels that no other patch covers show."""
    nodes, consts = _crop_nodes(margin, patch, "crop")
    inner = np.zeros((1, 1, patch, patch), np.float32)
    inner[..., edge:patch - edge, edge:patch - edge] = 1
    consts += [numpy_helper.from_array(inner, "inner"), numpy_helper.from_array(1 - inner, "edges")]
    nodes += [
        helper.make_node("Mul", ["crop", "inner"], ["kept"]),
        helper.make_node("Add", ["kept", "edges"], ["image"]),
    ]
    mask, image = _io(patch + 2 * margin, patch)
    return _save(helper.make_graph(nodes, "bright_edges", [mask], [image], initializer=consts), path)


def wrong_input_name(path: Path) -> Path:
    """Violates the contract: its input is called 'input', not 'mask'."""
    nodes, consts = _crop_nodes(20, 256, "image")
    nodes[0].input[0] = "input"
    mask, image = _io(296, 256)
    mask.name = "input"
    return _save(helper.make_graph(nodes, "wrong_input_name", [mask], [image], initializer=consts), path)


def slow_crop(path: Path, repeats: int = 60) -> Path:
    """The centre crop behind a chain of cheap but real convolutions, so a render takes long enough to kill."""
    nodes, consts = _crop_nodes(20, 256, "x0")
    consts.append(numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "identity"))
    for i in range(repeats):
        nodes.append(helper.make_node("Conv", [f"x{i}", "identity"], [f"x{i + 1}"]))
    nodes.append(helper.make_node("Identity", [f"x{repeats}"], ["image"]))
    mask, image = _io(296, 256)
    return _save(helper.make_graph(nodes, "slow_crop", [mask], [image], initializer=consts), path)


def conv_generator(path: Path, width: int = 16, depth: int = 3, seed: int = 0) -> Path:
    """A generator-shaped network with random weights for throughput benchmarks: the SAFRON front end (a
    41x41 valid convolution, 296 -> 256) then `depth` 3x3 convolutions and a tanh, so inference dominates
    the cost of a render as it does with a real generator."""
    rng = np.random.default_rng(seed)

    def weight(name, out_ch, in_ch, k):
        scale = np.sqrt(2.0 / (in_ch * k * k))
        return numpy_helper.from_array((rng.standard_normal((out_ch, in_ch, k, k)) * scale).astype(np.float32), name)

    consts = [weight("w_front", width, 3, 41), weight("w_out", 3, width, 1)]
    nodes = [helper.make_node("Conv", ["mask", "w_front"], ["h0"]),
             helper.make_node("LeakyRelu", ["h0"], ["a0"], alpha=0.2)]
    for i in range(depth):
        consts.append(weight(f"w{i}", width, width, 3))
        nodes += [
            helper.make_node("Conv", [f"a{i}", f"w{i}"], [f"h{i + 1}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"h{i + 1}"], [f"a{i + 1}"]),
        ]
    nodes += [helper.make_node("Conv", [f"a{depth}", "w_out"], ["logits"]),
              helper.make_node("Tanh", ["logits"], ["image"])]
    mask, image = _io(296, 256)
    return _save(helper.make_graph(nodes, "conv_generator", [mask], [image], initializer=consts), path)


def noise_mix(path: Path, patch: int = 256, margin: int = 20, share: float = 0.5, batch="N") -> Path:
    """A generator with noise channels (safron.noise): image = (1 - share) x the mask's centre crop + share x the
    noise's centre crop (3 noise channels), so a render shows the canvas noise exactly where the geometry is right."""
    nodes, consts = _crop_nodes(margin, patch, "crop")
    nodes.append(helper.make_node("Slice", ["noise", "starts", "ends", "axes"], ["noise_crop"]))
    consts += [
        numpy_helper.from_array(np.array(1 - share, np.float32), "keep"),
        numpy_helper.from_array(np.array(share, np.float32), "share"),
    ]
    nodes += [
        helper.make_node("Mul", ["crop", "keep"], ["crop_part"]),
        helper.make_node("Mul", ["noise_crop", "share"], ["noise_part"]),
        helper.make_node("Add", ["crop_part", "noise_part"], ["image"]),
    ]
    mask, image = _io(patch + 2 * margin, patch, batch)
    window = patch + 2 * margin
    noise = helper.make_tensor_value_info("noise", TensorProto.FLOAT, [batch, 3, window, window])
    return _save(helper.make_graph(nodes, "noise_mix", [mask, noise], [image], initializer=consts), path)
