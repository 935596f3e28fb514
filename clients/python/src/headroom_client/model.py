"""A PyTorch model as a headroom job.

headroom describes an MLP: the input flattened, ``Linear -> activation [-> Dropout]`` per hidden
width, then ``Linear -> classes`` into softmax cross-entropy. :func:`job_from_torch` reads a
``torch.nn.Sequential`` (nested ones too) of exactly that shape, with ``Flatten``, ``Linear``
(with bias), one kind of activation (``ReLU``, ``GELU``, ``Tanh``) and ``Dropout`` right after an
activation. Anything else is an error naming the module and its path in the model: never a
silent approximation. A model with dropout becomes a layer list (``model.layers``), one without
the shorthand (``hidden_layers``). The job's parameter count is checked against
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
    flattened = len(shape) == 1
    width = math.prod(shape)
    widths: list[int] = []
    dropout: dict[int, float] = {}
    activation: tuple[str, type[nn.Module]] | None = None
    expect_activation = False
    after_activation = False
    for path, leaf in _leaves(module, "model"):
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


def parameter_count(job: Json) -> int:
    """The parameters of a job's MLP (the shorthand or a layer list): every Linear's weights and
    bias."""
    model = job["model"]
    if "layers" in model:
        linears = [layer["linear"]["out_features"] for layer in model["layers"] if "linear" in layer]
        widths = [math.prod(model["input_shape"]), *linears]
    else:
        widths = [math.prod(model["input_shape"]), *model["hidden_layers"], model["num_classes"]]
    return sum((inputs + 1) * outputs for inputs, outputs in zip(widths, widths[1:]))
