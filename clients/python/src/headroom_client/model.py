"""A PyTorch model as a headroom job.

:func:`job_from_torch` reads a ``torch.nn.Sequential`` (nested ones too) into the job headroom
trains, module by module:

- an MLP (the input flattened, ``Linear -> activation [-> Dropout]`` per hidden width, then
  ``Linear -> classes``), with ``Flatten``, ``Linear`` (with bias), one kind of activation
  (``ReLU``, ``GELU``, ``Tanh``) and ``Dropout`` right after an activation, checked here; it
  becomes the shorthand (``hidden_layers``), or a layer list (``model.layers``) with dropout;
- an image model, which also holds ``Conv2d``, ``BatchNorm2d``, ``MaxPool2d``, ``AvgPool2d`` or
  ``AdaptiveAvgPool2d(1)``, becomes a layer list one entry per module. What a layer list cannot
  say (a non-square kernel, dilation, groups, ``ceil_mode``, batch norm's non-default
  ``momentum`` or ``eps``...) is refused here; the order of the layers is the server's to check,
  and its 422 names the layer's index.

Anything else is an error naming the module and its path in the model: never a silent
approximation. The job's parameter count is checked against
``sum(p.numel() for p in module.parameters())``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

Json = dict[str, Any]

#: PyTorch's activation modules and headroom's names for them. GELU's exact and tanh forms keep
#: the same tensors for backward, so they take the same memory.
ACTIVATIONS: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.GELU: "gelu", nn.Tanh: "tanh"}

#: The modules that make a model an image model, read into a layer list.
IMAGE_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)

#: Precisions headroom takes, in Lightning's names.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")


class UnsupportedModel(ValueError):
    """The model has a part headroom cannot describe; ``path`` says where."""

    def __init__(self, path: str, module: nn.Module | None, why: str) -> None:
        where = f"{path} ({type(module).__name__})" if module is not None else path
        super().__init__(f"{where}: {why}")
        self.path = path


def _leaves(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    """The modules of nested ``Sequential``s in order, with their paths."""
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{path}.{name}")
    else:
        yield path, module


def optimizer_spec(optimizer: str | Json | torch.optim.Optimizer) -> Json:
    """headroom's optimizer for a name (``sgd``, ``sgd_momentum``, ``adam``, ``adamw``), a spec,
    or a ``torch.optim`` optimizer (its first group's learning rate kept)."""
    if isinstance(optimizer, str):
        return {"name": optimizer}
    if isinstance(optimizer, dict):
        return dict(optimizer)
    group = optimizer.param_groups[0]
    if type(optimizer) is torch.optim.SGD:
        name = "sgd_momentum" if group.get("momentum", 0) else "sgd"
    elif type(optimizer) is torch.optim.Adam:
        name = "adam"
    elif type(optimizer) is torch.optim.AdamW:
        name = "adamw"
    else:
        raise UnsupportedModel(
            "optimizer",
            None,
            f"{type(optimizer).__name__} is not one headroom models; "
            "it takes SGD (with or without momentum), Adam and AdamW",
        )
    return {"name": name, "learning_rate": float(group["lr"])}


def job_from_torch(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    optimizer: str | Json | torch.optim.Optimizer = "adam",
    precision: str = "32-true",
    **job: Any,
) -> Json:
    """The headroom job that trains ``module`` on samples of ``input_shape`` (no batch
    dimension) with ``optimizer`` in ``precision``; ``job`` adds any other field of a job
    (``dataset_size``, ``headroom``, ``target_batch_size``, ``world_size``, ``search``...).

    Raises :class:`UnsupportedModel` naming the first module headroom cannot describe.
    """
    if precision not in PRECISIONS:
        raise UnsupportedModel("precision", None, f"{precision!r} is not one of {PRECISIONS}")
    shape = [int(d) for d in input_shape]
    if not shape or any(d < 1 for d in shape):
        raise UnsupportedModel("input_shape", None, f"{shape} is not a sample's shape")
    leaves = list(_leaves(module, "model"))
    if any(isinstance(leaf, IMAGE_MODULES) for _, leaf in leaves):
        model = _image_model(leaves, shape)
    else:
        model = _mlp_model(leaves, shape, module)
    spec: Json = {
        "model": model,
        "optimizer": optimizer_spec(optimizer),
        "precision": precision,
        **job,
    }
    described = parameter_count(spec)
    actual = sum(p.numel() for p in module.parameters())
    if described != actual:
        raise UnsupportedModel(
            "model", module, f"has {actual} parameters where the job describes {described}"
        )
    return spec


def _mlp_model(leaves: list[tuple[str, nn.Module]], shape: list[int], module: nn.Module) -> Json:
    """The job's model for an MLP's modules (the module docstring's first form)."""
    flattened = len(shape) == 1
    width = math.prod(shape)
    widths: list[int] = []
    dropout: dict[int, float] = {}
    activation: tuple[str, type[nn.Module]] | None = None
    expect_activation = False
    after_activation = False
    for path, leaf in leaves:
        if type(leaf) is nn.Dropout:
            if not after_activation:
                raise UnsupportedModel(
                    path, leaf, "headroom trains dropout right after a hidden layer's activation, once"
                )
            if leaf.inplace:
                raise UnsupportedModel(
                    path,
                    leaf,
                    "in-place dropout keeps a full-precision noise tensor where nn.Dropout() keeps "
                    "a one-byte mask; headroom models the latter",
                )
            dropout[len(widths) - 1] = float(leaf.p)
            after_activation = False
            continue
        after_activation = False
        if isinstance(leaf, nn.Flatten):
            if widths or leaf.start_dim not in (1, -len(shape) - 1) or leaf.end_dim != -1:
                raise UnsupportedModel(
                    path, leaf, "headroom flattens the whole sample once, before the first Linear"
                )
            flattened = True
        elif isinstance(leaf, nn.Linear):
            if expect_activation:
                raise UnsupportedModel(path, leaf, "headroom puts an activation between Linears")
            if not flattened:
                raise UnsupportedModel(
                    path, leaf, f"a Linear on a {shape} sample needs an nn.Flatten() before it"
                )
            if leaf.in_features != width:
                raise UnsupportedModel(
                    path, leaf, f"takes {leaf.in_features} features where {width} arrive"
                )
            if leaf.bias is None:
                raise UnsupportedModel(path, leaf, "headroom's Linear layers have a bias")
            widths.append(leaf.out_features)
            width = leaf.out_features
            expect_activation = True
        elif type(leaf) in ACTIVATIONS:
            if not expect_activation:
                raise UnsupportedModel(path, leaf, "headroom has an activation only after a Linear")
            if activation is not None and activation[1] is not type(leaf):
                raise UnsupportedModel(
                    path, leaf, f"headroom uses one activation throughout, and {activation[0]} came first"
                )
            activation = (ACTIVATIONS[type(leaf)], type(leaf))
            expect_activation = False
            after_activation = True
        else:
            raise UnsupportedModel(
                path,
                leaf,
                "headroom cannot describe this module; it takes nested nn.Sequential of "
                "Flatten, Linear, ReLU/GELU/Tanh and Dropout",
            )
    if not widths or not expect_activation:
        raise UnsupportedModel("model", module, "headroom's model ends in a Linear to the classes")
    name = activation[0] if activation else "relu"
    model: Json = {"input_shape": shape, "num_classes": widths[-1]}
    if dropout:
        layers: list[Json] = [{"flatten": {}}] if len(shape) > 1 else []
        for i, hidden in enumerate(widths[:-1]):
            layers += [{"linear": {"out_features": hidden}}, {name: {}}]
            if i in dropout:
                layers.append({"dropout": {"p": dropout[i]}})
        model["layers"] = layers + [{"linear": {"out_features": widths[-1]}}]
    else:
        model.update(hidden_layers=widths[:-1], activation=name)
    return model


def _square(path: str, leaf: nn.Module, name: str, value: Any) -> int:
    """One side of a square window argument (an int, or a pair of equal ints)."""
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
        return int(value[0])
    raise UnsupportedModel(path, leaf, f"{name}={value!r}: headroom's windows are square")


def _window(path: str, leaf: nn.Module, shape: list[int]) -> int:
    """The channels of the image that reaches a window layer."""
    if len(shape) != 3:
        raise UnsupportedModel(path, leaf, f"needs a channels x height x width image, and {shape} arrives")
    return shape[0]


def _image_layer(path: str, leaf: nn.Module, shape: list[int]) -> tuple[Json, list[int]]:
    """One module of an image model as a layer-list entry, and the shape it passes on."""
    def side(size: int, kernel: int, stride: int, padding: int) -> int:
        return (size + 2 * padding - kernel) // stride + 1

    if type(leaf) is nn.Conv2d:
        channels = _window(path, leaf, shape)
        k = _square(path, leaf, "kernel_size", leaf.kernel_size)
        stride = _square(path, leaf, "stride", leaf.stride)
        padding = _square(path, leaf, "padding", leaf.padding)
        if _square(path, leaf, "dilation", leaf.dilation) != 1 or leaf.groups != 1:
            raise UnsupportedModel(path, leaf, "headroom's convolutions have no dilation or groups")
        if leaf.padding_mode != "zeros":
            raise UnsupportedModel(path, leaf, "headroom's convolutions pad with zeros")
        if leaf.in_channels != channels:
            raise UnsupportedModel(path, leaf, f"takes {leaf.in_channels} channels where {channels} arrive")
        args: Json = {"out_channels": leaf.out_channels, "kernel_size": k}
        args.update({"stride": stride} if stride != 1 else {})
        args.update({"padding": padding} if padding else {})
        args.update({"bias": False} if leaf.bias is None else {})
        sides = [side(n, k, stride, padding) for n in shape[1:]]
        return {"conv2d": args}, [leaf.out_channels, *sides]
    if type(leaf) is nn.BatchNorm2d:
        if leaf.num_features != _window(path, leaf, shape):
            raise UnsupportedModel(
                path, leaf, f"normalizes {leaf.num_features} channels where {shape[0]} arrive"
            )
        if leaf.eps != 1e-5 or leaf.momentum != 0.1 or not leaf.track_running_stats:
            raise UnsupportedModel(
                path, leaf, "headroom trains batch norm as nn.BatchNorm2d's defaults do: eps 1e-5, "
                "momentum 0.1, running statistics tracked"
            )
        return {"batch_norm2d": {} if leaf.affine else {"affine": False}}, shape
    if type(leaf) in (nn.MaxPool2d, nn.AvgPool2d):
        _window(path, leaf, shape)
        k = _square(path, leaf, "kernel_size", leaf.kernel_size)
        stride = _square(path, leaf, "stride", leaf.stride if leaf.stride is not None else k)
        padding = _square(path, leaf, "padding", leaf.padding)
        if leaf.ceil_mode:
            raise UnsupportedModel(path, leaf, "headroom pools with ceil_mode=False")
        if isinstance(leaf, nn.MaxPool2d) and (
            _square(path, leaf, "dilation", leaf.dilation) != 1 or leaf.return_indices
        ):
            raise UnsupportedModel(
                path, leaf, "headroom's max pooling has no dilation and returns no indices"
            )
        if isinstance(leaf, nn.AvgPool2d) and (not leaf.count_include_pad or leaf.divisor_override):
            raise UnsupportedModel(
                path, leaf, "headroom's average pooling counts the padding (count_include_pad)"
            )
        args = {"kernel_size": k}
        args.update({"stride": stride} if stride != k else {})
        args.update({"padding": padding} if padding else {})
        kind = "max_pool2d" if isinstance(leaf, nn.MaxPool2d) else "avg_pool2d"
        return {kind: args}, [shape[0], *(side(n, k, stride, padding) for n in shape[1:])]
    if type(leaf) is nn.AdaptiveAvgPool2d:
        channels = _window(path, leaf, shape)
        if leaf.output_size not in (1, (1, 1)):
            raise UnsupportedModel(path, leaf, "headroom pools globally: AdaptiveAvgPool2d(1)")
        return {"global_avg_pool2d": {}}, [channels]
    if isinstance(leaf, nn.Flatten):
        if leaf.start_dim not in (1, -len(shape) - 1) or leaf.end_dim != -1:
            raise UnsupportedModel(path, leaf, "headroom flattens the whole sample")
        return {"flatten": {}}, [math.prod(shape)]
    if type(leaf) is nn.Linear:
        if len(shape) != 1 or leaf.in_features != shape[0]:
            raise UnsupportedModel(
                path, leaf, f"takes {leaf.in_features} features where {shape} arrives"
            )
        args = {"out_features": leaf.out_features}
        args.update({"bias": False} if leaf.bias is None else {})
        return {"linear": args}, [leaf.out_features]
    if type(leaf) in ACTIVATIONS:
        return {ACTIVATIONS[type(leaf)]: {}}, shape
    if type(leaf) is nn.Dropout and not leaf.inplace:
        return {"dropout": {"p": float(leaf.p)}}, shape
    raise UnsupportedModel(
        path,
        leaf,
        "headroom cannot describe this module; an image model takes nested nn.Sequential of Conv2d, "
        "BatchNorm2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Linear, ReLU/GELU/Tanh "
        "and Dropout (not in place)",
    )


def _image_model(leaves: list[tuple[str, nn.Module]], shape: list[int]) -> Json:
    """The job's model for an image model's modules: a layer list, one entry per module."""
    layers: list[Json] = []
    passed = shape
    for path, leaf in leaves:
        layer, passed = _image_layer(path, leaf, passed)
        layers.append(layer)
    if not layers or "linear" not in layers[-1]:
        raise UnsupportedModel("model", None, "headroom's model ends in a Linear to the classes")
    return {"input_shape": shape, "num_classes": layers[-1]["linear"]["out_features"], "layers": layers}


def parameter_count(job: Json) -> int:
    """The parameters of a job's model, as ``sum(p.numel())`` counts them: the shorthand's MLP,
    or a layer list without residual blocks (every convolution's and linear layer's weights and
    bias, batch norm's scale and shift)."""
    model = job["model"]
    if "layers" not in model:
        widths = [math.prod(model["input_shape"]), *model["hidden_layers"], model["num_classes"]]
        return sum((inputs + 1) * outputs for inputs, outputs in zip(widths, widths[1:]))
    shape = list(model["input_shape"])
    total = 0
    for layer in model["layers"]:
        ((kind, args),) = layer.items()
        if kind == "conv2d":
            k, stride, padding = args["kernel_size"], args.get("stride", 1), args.get("padding", 0)
            out = args["out_channels"]
            total += out * shape[0] * k * k + (out if args.get("bias", True) else 0)
            shape = [out, *((n + 2 * padding - k) // stride + 1 for n in shape[1:])]
        elif kind == "batch_norm2d":
            total += 2 * shape[0] if args.get("affine", True) else 0
        elif kind in ("max_pool2d", "avg_pool2d"):
            k, padding = args["kernel_size"], args.get("padding", 0)
            stride = args.get("stride") or k
            shape = [shape[0], *((n + 2 * padding - k) // stride + 1 for n in shape[1:])]
        elif kind == "global_avg_pool2d":
            shape = [shape[0]]
        elif kind == "flatten":
            shape = [math.prod(shape)]
        elif kind == "linear":
            out = args["out_features"]
            total += math.prod(shape) * out + (out if args.get("bias", True) else 0)
            shape = [out]
    return total
