"""One step of a traced PyTorch model as one layer of a job: a ``torch.nn`` module, or the
functional call (``F.relu``, ``torch.flatten``, ``x.view(x.size(0), -1)``...) that means the
same. Each entry says exactly what the module does; what a layer list cannot say is refused
with the argument at fault."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from headroom_client.client import Json



class Unsupported(ValueError):
    """A step headroom cannot describe; the reader adds where it is."""


#: What the reader takes, for the messages that refuse the rest.
SUPPORTED = (
    "Embedding (first, over token ids), Conv2d, Linear (tied to the embedding or not), BatchNorm1d/2d, "
    "LayerNorm and RMSNorm (over the last dimension; Hugging Face's LlamaRMSNorm too), MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Dropout, Flatten, "
    "Identity, ReLU, ReLU6, LeakyReLU, GELU, Tanh, Sigmoid and SiLU (as modules or their "
    "functional forms), torch.flatten or view/reshape to (batch, -1), x.mean(dim=1) over a sequence, "
    "and residual additions; "
    "write anything else as a JSON job's model.layers"
)


#: Layer kinds that never hold a parameter.
PARAMETER_FREE = frozenset(
    {"dropout", "identity", "relu", "relu6", "leaky_relu", "gelu", "tanh", "sigmoid", "silu", "flatten",
     "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "global_avg_pool2d", "mean_pool", "first_token"}
)


def holds_no_parameters(layer: Json) -> bool:
    """Whether a job's layer is of a kind that holds no parameter."""
    return next(iter(layer)) in PARAMETER_FREE


def _square(name: str, value: Any) -> int:
    """One side of a square window argument (an int, or a pair of equal ints)."""
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1]:
        if isinstance(value[0], int):
            return value[0]
    raise Unsupported(f"{name}={value!r}: headroom's windows are square")


def _image(shape: list[int]) -> None:
    """Refuses anything but a channels x height x width sample."""
    if len(shape) != 3:
        raise Unsupported(f"needs a channels x height x width sample, and {shape} arrives")


def _given(args: Json, defaults: Json) -> Json:
    """``args`` without the entries equal to the server's defaults."""
    return {key: value for key, value in args.items() if defaults.get(key, object()) != value}


def conv2d(conv: nn.Conv2d, shape: list[int]) -> Json:
    _image(shape)
    k = _square("kernel_size", conv.kernel_size)
    dilation = _square("dilation", conv.dilation)
    if conv.padding_mode != "zeros":
        raise Unsupported(f"padding_mode={conv.padding_mode!r}: headroom's convolutions pad with zeros")
    if conv.padding == "valid":
        padding = 0
    elif conv.padding == "same":
        if (k - 1) * dilation % 2:
            raise Unsupported("padding='same' with an even span pads one side more: give the padding")
        padding = (k - 1) * dilation // 2
    else:
        padding = _square("padding", conv.padding)
    args = {
        "out_channels": conv.out_channels,
        "kernel_size": k,
        "stride": _square("stride", conv.stride),
        "padding": padding,
        "dilation": dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
    }
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": True}
    return {"conv2d": _given(args, defaults)}


def linear(layer: nn.Linear, shape: list[int]) -> Json:
    args = {"out_features": layer.out_features, "bias": layer.bias is not None}
    return {"linear": _given(args, {"bias": True})}


def batch_norm(norm: nn.modules.batchnorm._BatchNorm, shape: list[int]) -> Json:
    if not norm.track_running_stats or norm.momentum is None:
        raise Unsupported(
            "headroom trains batch norm with running statistics moved by a momentum "
            "(track_running_stats=True, momentum a number)"
        )
    kind = "batch_norm2d" if isinstance(norm, nn.BatchNorm2d) else "batch_norm1d"
    if kind == "batch_norm2d":
        _image(shape)
    args = {"affine": norm.affine, "eps": norm.eps, "momentum": norm.momentum}
    return {kind: _given(args, {"affine": True, "eps": 1e-5, "momentum": 0.1})}


def layer_norm(norm: nn.LayerNorm, shape: list[int]) -> Json:
    if tuple(norm.normalized_shape) != tuple(shape[-1:]):
        raise Unsupported(
            f"normalized_shape={tuple(norm.normalized_shape)} over a {shape} sample: headroom "
            "normalizes the last dimension only"
        )
    args = {"eps": norm.eps, "elementwise_affine": norm.elementwise_affine, "bias": norm.bias is not None}
    if not norm.elementwise_affine:
        args["bias"] = True
    return {"layer_norm": _given(args, {"eps": 1e-5, "elementwise_affine": True, "bias": True})}


def rms_norm(norm: nn.RMSNorm, shape: list[int]) -> Json:
    if tuple(norm.normalized_shape) != tuple(shape[-1:]):
        raise Unsupported(
            f"normalized_shape={tuple(norm.normalized_shape)} over a {shape} sample: headroom "
            "normalizes the last dimension only"
        )
    args = {"eps": norm.eps, "elementwise_affine": norm.elementwise_affine}
    return {"rms_norm": _given(args, {"eps": None, "elementwise_affine": True})}


#: Hugging Face's RMS norms: one code (``LlamaRMSNorm``'s), computed by hand in f32.
HUGGING_FACE_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def hugging_face_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``LlamaRMSNorm`` (or Mistral's, Qwen2's)."""
    return type(module).__name__ in HUGGING_FACE_RMS_NORMS and hasattr(module, "variance_epsilon")


def composite_rms_norm(norm: nn.Module) -> Json:
    """A Hugging Face RMS norm: its weight and ``variance_epsilon``, computed as transformers does."""
    return {"rms_norm": {"eps": norm.variance_epsilon, "implementation": "composite"}}


def mean_pool(dim: Any, keepdim: bool, shape: list[int]) -> Json:
    """``x.mean(dim=1)``: the mean over a ``[positions, features]`` sample's positions."""
    if len(shape) != 2 or dim not in (1, -2) or keepdim:
        raise Unsupported(
            f"mean(dim={dim!r}, keepdim={keepdim}) over a {shape} sample: headroom takes the mean over "
            "the positions of a [positions, features] sample (dim=1)"
        )
    return {"mean_pool": {}}


def embedding(table: nn.Embedding, shape: list[int]) -> Json:
    if table.max_norm is not None or table.scale_grad_by_freq or table.sparse:
        raise Unsupported("max_norm, scale_grad_by_freq and sparse: headroom's embedding is the plain lookup")
    if len(shape) != 1:
        raise Unsupported(f"an Embedding over a {shape} sample: headroom's read one sequence of ids")
    args: Json = {"embedding_dim": table.embedding_dim}
    if table.padding_idx is not None:
        args["padding_idx"] = table.padding_idx
    return {"embedding": args}


def pool(kind: str, args: Json, shape: list[int]) -> Json:
    """``max_pool2d`` or ``avg_pool2d`` from PyTorch's arguments (a module's or a call's)."""
    _image(shape)
    k = _square("kernel_size", args["kernel_size"])
    stride = args.get("stride")
    entry: Json = {
        "kernel_size": k,
        "stride": k if stride is None or stride == [] else _square("stride", stride),
        "padding": _square("padding", args.get("padding", 0)),
        "ceil_mode": bool(args.get("ceil_mode", False)),
    }
    if kind == "max_pool2d":
        if args.get("return_indices"):
            raise Unsupported("return_indices=True: headroom's max pooling returns the values")
        entry["dilation"] = _square("dilation", args.get("dilation", 1))
    else:
        if args.get("divisor_override"):
            raise Unsupported("divisor_override: headroom divides by the window")
        entry["count_include_pad"] = bool(args.get("count_include_pad", True))
    defaults = {"stride": k, "padding": 0, "dilation": 1, "ceil_mode": False, "count_include_pad": True}
    return {kind: _given(entry, defaults)}


def adaptive_avg_pool2d(size: Any, shape: list[int]) -> Json:
    _image(shape)
    sides = [size, size] if isinstance(size, int) else list(size)
    if len(sides) != 2 or any(side is None for side in sides):
        raise Unsupported(f"output_size={size!r}: headroom takes both sides")
    return {"adaptive_avg_pool2d": {"output_size": sides[0] if sides[0] == sides[1] else sides}}


def dropout(p: float, inplace: bool) -> Json:
    if inplace:
        raise Unsupported(
            "in-place dropout keeps a full-precision noise tensor where nn.Dropout() keeps a "
            "one-byte mask; headroom models the latter"
        )
    return {"dropout": {"p": float(p)}}


def flatten(start_dim: int, end_dim: int, shape: list[int]) -> Json:
    if start_dim not in (1, -len(shape) - 1) or end_dim != -1:
        raise Unsupported(f"flatten({start_dim}, {end_dim}): headroom flattens all of a sample")
    return {"flatten": {}}


def activation(kind: str, inplace: bool = False, **args: Any) -> Json:
    """An activation; ``silu``, ``tanh`` and ``sigmoid`` have no in-place form in a job."""
    if inplace and kind in ("silu", "tanh", "sigmoid"):
        raise Unsupported(f"in-place {kind}: headroom's {kind} writes a new tensor")
    entry = dict(args)
    if inplace:
        entry["inplace"] = True
    return {kind: entry}


def gelu(approximate: str) -> Json:
    return {"gelu": {"approximate": approximate} if approximate != "none" else {}}


def leaky_relu(negative_slope: float, inplace: bool) -> Json:
    args: Json = {"negative_slope": negative_slope} if negative_slope != 0.01 else {}
    return activation("leaky_relu", inplace, **args)


def of_module(module: nn.Module, shape: list[int]) -> Json:
    """The layer a ``torch.nn`` leaf module is."""
    if isinstance(module, nn.Conv2d):
        return conv2d(module, shape)
    if isinstance(module, nn.Linear):
        return linear(module, shape)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return batch_norm(module, shape)
    if isinstance(module, nn.LayerNorm):
        return layer_norm(module, shape)
    if isinstance(module, nn.RMSNorm):
        return rms_norm(module, shape)
    if hugging_face_rms_norm(module):
        return composite_rms_norm(module)
    if isinstance(module, nn.Embedding):
        return embedding(module, shape)
    if isinstance(module, nn.MaxPool2d):
        return pool("max_pool2d", vars(module), shape)
    if isinstance(module, nn.AvgPool2d):
        return pool("avg_pool2d", vars(module), shape)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return adaptive_avg_pool2d(module.output_size, shape)
    if isinstance(module, nn.Dropout):
        return dropout(module.p, module.inplace)
    if isinstance(module, nn.Flatten):
        return flatten(module.start_dim, module.end_dim, shape)
    if isinstance(module, nn.Identity):
        return {"identity": {}}
    if isinstance(module, nn.ReLU):
        return activation("relu", module.inplace)
    if isinstance(module, nn.ReLU6):  # before Hardtanh, of which it is one
        return activation("relu6", module.inplace)
    if isinstance(module, nn.LeakyReLU):
        return leaky_relu(module.negative_slope, module.inplace)
    if isinstance(module, nn.GELU):
        return gelu(module.approximate)
    if isinstance(module, nn.SiLU):
        return activation("silu", module.inplace)
    if isinstance(module, nn.Tanh):
        return activation("tanh")
    if isinstance(module, nn.Sigmoid):
        return activation("sigmoid")
    raise Unsupported(f"headroom cannot describe this module; it reads {SUPPORTED}")


#: Functional calls (and the tensor methods of the same names) as layers, from their
#: arguments normalized to PyTorch's keyword names.
FUNCTIONS: dict[Any, Callable[[Json, list[int]], Json]] = {
    F.relu: lambda a, s: activation("relu", a.get("inplace", False)),
    torch.relu: lambda a, s: activation("relu"),
    torch.relu_: lambda a, s: activation("relu", True),
    F.relu6: lambda a, s: activation("relu6", a.get("inplace", False)),
    F.leaky_relu: lambda a, s: leaky_relu(a.get("negative_slope", 0.01), a.get("inplace", False)),
    F.gelu: lambda a, s: gelu(a.get("approximate", "none")),
    F.silu: lambda a, s: activation("silu", a.get("inplace", False)),
    torch.tanh: lambda a, s: activation("tanh"),
    F.tanh: lambda a, s: activation("tanh"),
    torch.sigmoid: lambda a, s: activation("sigmoid"),
    F.sigmoid: lambda a, s: activation("sigmoid"),
    torch.flatten: lambda a, s: flatten(a.get("start_dim", 0), a.get("end_dim", -1), s),
    F.adaptive_avg_pool2d: lambda a, s: adaptive_avg_pool2d(a["output_size"], s),
    F.max_pool2d: lambda a, s: pool("max_pool2d", a, s),
    F.avg_pool2d: lambda a, s: pool("avg_pool2d", a, s),
    F.dropout: lambda a, s: dropout(a.get("p", 0.5), a.get("inplace", False)),
    torch.mean: lambda a, s: mean_pool(a.get("dim"), a.get("keepdim", False), s),
}

#: Tensor methods as layers: the name, and the arguments after the tensor by position.
METHODS: dict[str, tuple[Callable[[Json, list[int]], Json], tuple[str, ...]]] = {
    "relu": (lambda a, s: activation("relu"), ()),
    "relu_": (lambda a, s: activation("relu", True), ()),
    "tanh": (lambda a, s: activation("tanh"), ()),
    "sigmoid": (lambda a, s: activation("sigmoid"), ()),
    "flatten": (lambda a, s: flatten(a.get("start_dim", 0), a.get("end_dim", -1), s), ("start_dim", "end_dim")),
    "mean": (lambda a, s: mean_pool(a.get("dim"), a.get("keepdim", False), s), ("dim", "keepdim")),
}


def of_reshape(sizes: list[Any], shape: list[int]) -> Json:
    """``x.view(...)``/``x.reshape(...)``, which headroom takes as ``flatten`` when it keeps the
    batch and puts all of a sample in one dimension; ``sizes`` are ints, or ``None`` for the
    batch read back from the tensor."""
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    whole = math.prod(shape)
    if len(sizes) == 2 and sizes[0] in (None, -1) and sizes[1] in (-1, whole) and sizes != [-1, -1]:
        return {"flatten": {}}
    raise Unsupported(f"reshape to {sizes}: headroom takes view/reshape to (batch, -1) only")
