"""A PyTorch model as a headroom job.

:func:`job_from_torch` reads any ``nn.Module`` that ``torch.fx`` can trace (``nn.Sequential``,
a subclass with its own ``forward``, torchvision's classifiers) into the job headroom trains:
every step of its graph one layer of ``model.layers`` (see :mod:`headroom_client.torch_graph`),
residual additions read from the graph as ``residual`` blocks. A plain MLP (``Linear`` layers
with bias and one activation between them, nothing in place) becomes the shorthand
(``hidden_layers``). What a job cannot say is an error naming the module's path in the model and
what headroom reads: never a silent approximation. The job's parameter count is checked against
``sum(p.numel() for p in module.parameters())``.

A Hugging Face ``PreTrainedModel`` is read from its config instead (``model.huggingface``, for
the model types headroom reads), with PyTorch's parameter count in the job for the service to
check against the layers it reads the config as; ``gradient_checkpointing_enable()`` as
``model.gradient_checkpointing``, and peft's LoRA around it (``get_peft_model``) as
``model.lora``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from headroom_client.client import Json
from headroom_client.shapes import parameter_count
from headroom_client.torch_graph import UnsupportedModel, read_layers, token_vocab


__all__ = ["PRECISIONS", "UnsupportedModel", "job_from_torch", "optimizer_spec", "parameter_count"]

#: The activations the shorthand names.
SHORTHAND_ACTIVATIONS = ("relu", "gelu", "tanh")

#: Hugging Face ``model_type``s headroom reads a config of, and whether each reads token ids.
HUGGING_FACE_TYPES = {"llama": True, "mistral": True, "qwen2": True, "gpt2": True, "vit": False}

#: Precisions headroom takes, in Lightning's names.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")


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
    A model whose input goes first into an ``nn.Embedding`` reads token ids: ``input_shape``
    is ``[sequence_length]``, and the job's ``model.tokens`` takes the vocabulary from it.

    Raises :class:`UnsupportedModel` naming the first step headroom cannot describe.
    """
    if precision not in PRECISIONS:
        raise UnsupportedModel("precision", None, f"{precision!r} is not one of {PRECISIONS}")
    shape = [int(d) for d in input_shape]
    if not shape or any(d < 1 for d in shape):
        raise UnsupportedModel("input_shape", None, f"{shape} is not a sample's shape")
    fields = {"optimizer": optimizer_spec(optimizer), "precision": precision, **job}
    hugging_face = _hugging_face_model(module, shape)
    if hugging_face is not None:
        return {"model": hugging_face, **fields}
    layers, output = read_layers(module, shape)
    vocab = token_vocab(module)
    if vocab is not None:
        if len(shape) != 1 or len(output) not in (1, 2):
            raise UnsupportedModel(
                "model", module,
                f"reads token ids of shape {shape} into a {output} tensor; headroom reads one sequence "
                "of ids into one score per class, or per token",
            )
        model: Json = {"tokens": {"sequence_length": shape[0], "vocab_size": vocab},
                       "num_classes": output[-1], "layers": layers}
    elif len(output) != 1:
        raise UnsupportedModel(
            "model", module, f"ends in a {output} tensor; headroom's models end in one score per class"
        )
    else:
        model = {"input_shape": shape, "num_classes": output[0], **_shorthand_or_list(layers, shape)}
    spec: Json = {"model": model, **fields}
    described = parameter_count(spec)
    actual = sum(p.numel() for p in module.parameters())
    if described != actual:
        raise UnsupportedModel(
            "model", module,
            f"has {actual} parameters where the job describes {described}: a parameter is used "
            "outside the layers headroom read",
        )
    return spec


def _hugging_face_model(module: nn.Module, shape: list[int]) -> Json | None:
    """A ``PreTrainedModel``'s job model: its config as ``model.huggingface`` (with the
    ``attn_implementation`` it runs), the sequence length (``shape`` is ``[sequence_length]``)
    for a language model, and PyTorch's parameter count; ``None`` for any other module."""
    config: Any = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or not hasattr(config, "to_json_string"):
        return None
    if model_type not in HUGGING_FACE_TYPES:
        raise UnsupportedModel(
            "model", module,
            f"a Hugging Face {model_type!r} model; headroom reads the configs of "
            f"{', '.join(HUGGING_FACE_TYPES)}: describe it as a job's model.layers instead",
        )
    lora = _lora(module)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    if frozen and lora is None:
        raise UnsupportedModel(
            "model", module,
            f"freezes {frozen} of its parameters; headroom reads a Hugging Face model from its config, "
            "which trains every parameter: describe it as a job's model.layers, frozen parts in \"frozen\"",
        )
    described: Json = {
        "huggingface": json.loads(config.to_json_string(use_diff=False)),
        "parameter_count": sum(p.numel() for p in module.parameters()),
    }
    if lora is not None:
        described["lora"] = lora
    if _checkpoints_every_layer(module):
        described["gradient_checkpointing"] = True
    # How the model computes attention, which config.json does not store: headroom runs
    # "sdpa" and "eager", and names any other it is given.
    implementation = getattr(config, "_attn_implementation", None)
    if isinstance(implementation, str):
        described["huggingface"]["attn_implementation"] = implementation
    if HUGGING_FACE_TYPES[model_type]:
        if len(shape) != 1:
            raise UnsupportedModel(
                "input_shape", None,
                f"{shape}: a {model_type} model reads a sequence of token ids, [sequence_length]",
            )
        described["tokens"] = {"sequence_length": shape[0]}
    else:
        side = config.image_size
        image = [config.num_channels, *(side if isinstance(side, (list, tuple)) else (side, side))]
        if shape != image:
            raise UnsupportedModel(
                "input_shape", None, f"{shape}: this {model_type} model's config reads images of {image}"
            )
    return described


def _checkpoints_every_layer(module: nn.Module) -> bool:
    """Whether ``activation_checkpointing_enable()`` (``gradient_checkpointing_enable()``) was
    called as headroom reads it: every decoder layer under ``torch.utils.checkpoint``,
    non-reentrant, on the device. Another setting is named, not read as this one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    checkpointed = [m for m in layers if m.gradient_checkpointing]
    if not checkpointed:
        return False
    if len(checkpointed) != len(layers):
        raise UnsupportedModel(
            "model", module,
            f"checkpoints {len(checkpointed)} of its {len(layers)} layers (every_n_layers); "
            "headroom reads checkpointing of every layer",
        )
    function: Any = checkpointed[0]._gradient_checkpointing_func
    if getattr(function, "func", None) is not torch.utils.checkpoint.checkpoint:
        raise UnsupportedModel(
            "model", module,
            "checkpoints through another function than torch.utils.checkpoint (offload=True "
            "keeps activations on the host); headroom reads activations kept on the device",
        )
    if function.keywords.get("use_reentrant") is True:
        raise UnsupportedModel(
            "model", module,
            "checkpoints with use_reentrant=True; headroom reads the non-reentrant checkpoint, "
            "activation_checkpointing_enable()'s default",
        )
    return True


def _lora(module: nn.Module) -> Json | None:
    """A peft ``PeftModel``'s LoRA adapters as the job's ``model.lora`` (peft's
    ``LoraConfig``), ``None`` for a module peft did not wrap. Only plain LoRA is read: every
    trainable parameter an adapter's, one adapter, no bias trained, no layer saved whole."""
    configs: Any = getattr(module, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    if len(configs) != 1:
        raise UnsupportedModel("model", module, f"holds {len(configs)} adapters; headroom reads one")
    (config,) = configs.values()
    kind = str(getattr(config, "peft_type", ""))
    if not kind.endswith("LORA"):
        raise UnsupportedModel("model", module, f"is a peft {kind} model; headroom reads LoRA")
    extras = {"bias": "none", "modules_to_save": None, "use_dora": False, "use_rslora": False}
    for name, plain in extras.items():
        if getattr(config, name, plain) not in (plain, [], set()):
            raise UnsupportedModel(
                "model", module,
                f"sets LoraConfig.{name}={getattr(config, name)!r}; headroom reads plain LoRA ({name}={plain!r})",
            )
    trained = [name for name, p in module.named_parameters() if p.requires_grad and "lora_" not in name]
    if trained:
        raise UnsupportedModel("model", module, f"trains {trained[0]} beside its adapters; headroom reads plain LoRA")
    targets = config.target_modules
    return {
        "r": int(config.r),
        "lora_alpha": float(config.lora_alpha),
        "lora_dropout": float(config.lora_dropout),
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
    }


def _shorthand_or_list(layers: list[Json], shape: list[int]) -> Json:
    """``hidden_layers`` and ``activation`` for a plain MLP (the sample flattened, then
    ``Linear`` layers with bias and one activation between them), else ``layers``."""
    body = layers
    if len(shape) > 1:
        body = layers[1:] if layers[:1] == [{"flatten": {}}] else []
    linears, activations = body[::2], body[1::2]
    names = {next(iter(layer)) for layer in activations}
    plain = (
        len(body) % 2 == 1
        and all(list(layer) == ["linear"] and list(layer["linear"]) == ["out_features"] for layer in linears)
        and all(layer == {next(iter(layer)): {}} for layer in activations)
        and len(names) <= 1
        and names <= set(SHORTHAND_ACTIVATIONS)
    )
    if not plain:
        return {"layers": layers}
    name = names.pop() if names else "relu"
    return {"hidden_layers": [layer["linear"]["out_features"] for layer in linears[:-1]], "activation": name}
