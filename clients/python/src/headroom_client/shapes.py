"""A job's layer list walked as the server walks it: each layer's output shape and its
parameters, counted as ``sum(p.numel() for p in module.parameters())`` counts them. Needs no
torch: it is how :func:`~headroom_client.model.job_from_torch` checks the job it wrote."""

from __future__ import annotations

import math
from typing import Any

from headroom_client.client import Json


#: Layers that keep a sample's shape and hold no parameters.
SHAPE_KEEPING = frozenset(
    {"dropout", "identity", "relu", "relu6", "leaky_relu", "gelu", "tanh", "sigmoid", "silu"}
)


def _windowed(side: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """One side after a window, as PyTorch's pooling and convolution compute it."""
    span = side + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    # With ceil_mode, the last window must start inside the input or its left padding.
    if ceil_mode and (out - 1) * stride >= side + padding:
        out -= 1
    return out


def walk(layers: list[Json], shape: list[int], vocab: int | None = None) -> tuple[int, list[int]]:
    """The parameters of ``layers`` over samples of ``shape`` (token ids below ``vocab`` when
    given), and the shape they pass on."""
    total = 0
    for layer in layers:
        ((kind, args),) = layer.items()
        count, shape = _layer(kind, args, shape, vocab)
        total += count
    return total, shape


def _layer(kind: str, args: Json, shape: list[int], vocab: int | None) -> tuple[int, list[int]]:
    """One layer's parameters and output shape."""
    if kind in SHAPE_KEEPING:
        return 0, shape
    if kind == "embedding":
        return (vocab or 0) * args["embedding_dim"], [*shape, args["embedding_dim"]]
    if kind == "conv2d":
        k, out, groups = args["kernel_size"], args["out_channels"], args.get("groups", 1)
        sides = [
            _windowed(n, k, args.get("stride", 1), args.get("padding", 0), args.get("dilation", 1), False)
            for n in shape[1:]
        ]
        weights = out * (shape[0] // groups) * k * k
        return weights + (out if args.get("bias", True) else 0), [out, *sides]
    if kind in ("max_pool2d", "avg_pool2d"):
        k = args["kernel_size"]
        stride = args.get("stride") or k
        dilation = args.get("dilation", 1)
        sides = [
            _windowed(n, k, stride, args.get("padding", 0), dilation, args.get("ceil_mode", False))
            for n in shape[1:]
        ]
        return 0, [shape[0], *sides]
    if kind == "adaptive_avg_pool2d":
        size = args["output_size"]
        return 0, [shape[0], *([size, size] if isinstance(size, int) else size)]
    if kind == "global_avg_pool2d":
        return 0, [shape[0]]
    if kind in ("batch_norm2d", "batch_norm1d"):
        return (2 * shape[0] if args.get("affine", True) else 0), shape
    if kind == "layer_norm":
        affine = args.get("elementwise_affine", True)
        learnt = (1 + int(args.get("bias", True))) if affine else 0
        return learnt * shape[-1], shape
    if kind == "rms_norm":
        return (shape[-1] if args.get("elementwise_affine", True) else 0), shape
    if kind == "mean_pool":
        return 0, shape[1:]
    if kind == "flatten":
        return 0, [math.prod(shape)]
    if kind == "linear":
        out = args["out_features"]
        weights = 0 if args.get("tied", False) else shape[-1] * out  # a tied head's are the table
        return weights + (out if args.get("bias", True) else 0), [*shape[:-1], out]
    if kind in ("frozen", "checkpoint"):
        return walk(args["layers"], shape, vocab)
    if kind == "residual":
        body, passed = walk(args["layers"], shape, vocab)
        shortcut, _ = walk(args.get("shortcut", []), shape, vocab)
        return body + shortcut, passed
    raise ValueError(f"{kind!r} is not a layer headroom knows")


def parameter_count(job: Json) -> int:
    """The parameters of a job's model: the shorthand's MLP, or its layer list (frozen ones
    included). A LoRA job's adapters are not counted here: the service's estimate gives both
    counts (``parameter_count``, ``trainable_parameter_count``)."""
    model = job["model"]
    if "lora" in model:
        raise ValueError("model.lora: the service's estimate counts a LoRA model's parameters")
    if "layers" not in model:
        widths = [math.prod(model["input_shape"]), *model["hidden_layers"], model["num_classes"]]
        return sum((inputs + 1) * outputs for inputs, outputs in zip(widths, widths[1:]))
    tokens = model.get("tokens")
    if tokens:
        count, _ = walk(model["layers"], [tokens["sequence_length"]], tokens["vocab_size"])
        return count
    count, _ = walk(model["layers"], list(model["input_shape"]))
    return count
