"""headroom's PyTorch profile against PyTorch's own accounting of the same training step.

Two sets of models, in one process:

- every example job given, in every precision and at several batch sizes; the examples named
  after a torchvision model (`resnet18-imagenet`, ...) are checked against torchvision's own
  module, not a rebuild of the job's list, so the list is shown to mean that model;
- `--random N` layer lists drawn by a seeded generator over every layer kind headroom accepts, over
  images, sequences (`[positions, features]`) and feature vectors
  (`--seed`, printed, reproduces a run), each with a random optimizer, precision and batch size.

A job given by a Hugging Face config (`model.huggingface`, as `tests/pytorch/hugging-face/`) is
checked against transformers' own model built from that config (no weights), with peft's LoRA,
`gradient_checkpointing_enable()` and `fully_shard` on each decoder layer as the job asks, and
trained as transformers' users train it: `loss = model(input_ids=x, labels=y).loss`, the output
let go, then backward and the step as below.

For each, this builds the model in PyTorch, runs one steady-state training step (a warm-up step
first, so the optimizer's state exists, as it does in every step of a real run) and reads its peak
memory by category, then asks `headroom estimate JOB --batch-size N --traced --json` for the
PyTorch profile's peak, and requires the two within 0.1% or 1 KiB, and the categories where the
two name the same thing likewise. Every generated list must be accepted by headroom.

Without a GPU (the default) PyTorch runs under FakeTensorMode, and
`torch.distributed._tools.mem_tracker.MemTracker` follows every tensor the step creates and
frees. Under any such tracer autograd sums a parameter's gradients out of place (a traced tensor
holds one more reference), which `--traced` models; untraced PyTorch sums in place, which the
profile models otherwise. A job sharded with FSDP (`"sharding": "fsdp"`) runs as rank 0 of a
fake process group of `world_size` ranks, `fully_shard` on every top-level residual block and
checkpoint and then on the model, under
`torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker`, after two untracked steps. The
optimizers are PyTorch's `foreach` implementations, which PyTorch picks on a GPU. Under autocast both devices compute the loss from an f32 copy of the logits
(the CPU's autocast casts them at `cross_entropy_loss`, CUDA's at its `log_softmax`), alive
while the loss is computed. Where the CPU differs from CUDA the check follows CUDA: dropout takes
the fused `native_dropout` (one-byte mask), layer norm runs in f32 under autocast (CUDA's autocast
policy; the CPU's keeps it 16-bit), and batch norm and layer norm over 16-bit values save their
statistics in f32 on CUDA (in 16-bit here), 4 bytes a channel or a row the band allows for.
With `--cuda`, on a real GPU, the step runs for real and `torch.cuda.max_memory_allocated` and
`max_memory_reserved` are compared with the profile's peak under the caching allocator's
rounding, within 3% (cuDNN's and cuBLAS's workspaces are outside the model).

The step is the one a PyTorch user writes:

    x, y = batch                      # f32 inputs, int64 labels, on the device
    x = x.to(torch.bfloat16)          # bf16-true only: the model is bf16, the loader's batch f32
    with torch.autocast(...):         # bf16-mixed and 16-mixed only
        loss = F.cross_entropy(model(x), y)
    (loss * scale).backward()         # 16-mixed: GradScaler's scaled backward, then unscale_
    optimizer.step()
    optimizer.zero_grad()             # set_to_none

GradScaler reads its overflow flag with `.item()`, which fake tensors cannot answer, so under
16-mixed the script scales and unscales as GradScaler does, by hand: the same allocations.

Exits 1 if any comparison is outside the band or a generated list is refused, 2 on a usage
error; prints a table either way.
"""

import argparse
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import pathlib
import random
import re
import subprocess
import sys
import time
import unittest.mock

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

RELATIVE = 0.001
SLACK_BYTES = 1024
CUDA_BAND = (0.97, 1.03)
PRECISIONS = ["32-true", "bf16-mixed", "16-mixed", "bf16-true"]
OPTIMIZERS = ["sgd", "sgd_momentum", "adam", "adamw"]
DEFAULT_BATCHES = [1, 16, 256, 4096]
TORCHVISION_BATCHES = [1, 32, 256]


class GpuDropout(nn.Module):
    """`nn.Dropout` as PyTorch runs it on a GPU: `at::dropout` takes the fused `native_dropout`
    there, which writes the output and a one-byte mask and saves only the mask for backward. On
    the CPU `nn.Dropout` saves a full-precision noise tensor instead, so the step under
    FakeTensorMode on the CPU calls `native_dropout` itself."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


class CudaLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` under CUDA's autocast policy: CUDA's autocast runs `layer_norm` in f32 (a
    16-bit input cast first), the CPU's in 16-bit; the step under FakeTensorMode on the CPU
    applies CUDA's. `positions` (rows per sample) sizes the band's allowance: on CUDA the saved
    mean and rstd are f32 for 16-bit values too, here 16-bit (bf16-true)."""

    def __init__(self, shape, **args):
        super().__init__(shape[-1], **args)
        self.positions = 1
        for s in shape[:-1]:
            self.positions *= s

    def forward(self, x):
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class FusedRmsNorm(torch.autograd.Function):
    """CUDA's `_fused_rms_norm` as autograd sees it: the output in the input's type and an f32
    `rstd` per row; saved are the input, `rstd` and the weight; backward makes the input's
    gradient and the weight's. The CPU has only the composite (pow, mean, rsqrt, products:
    three f32 copies of the input saved), so the step on the CPU allocates what CUDA's kernel
    writes (FakeTensorMode holds no values) and on a GPU calls the kernel itself."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        if x.is_cuda:
            y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        else:
            y = torch.empty_like(x)
            rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1]]
        if x.is_cuda:
            dx, dweight = torch.ops.aten._fused_rms_norm_backward(dy, x, [x.shape[-1]], rstd, weight, wanted)
        else:
            dx = torch.empty_like(x) if wanted[0] else None
            dweight = torch.empty_like(weight) if wanted[1] else None
        return dx, dweight, None


class CudaRmsNorm(nn.RMSNorm):
    """`nn.RMSNorm` as CUDA runs it: fused ([`FusedRmsNorm`]) where the input's type is the
    weight's (headroom refuses the composite case), in the input's type under autocast (whose
    lists do not name it)."""

    def forward(self, x):
        if self.weight is not None and self.weight.dtype != x.dtype:
            raise ValueError("the composite rms_norm path is not what headroom models")
        eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
        return FusedRmsNorm.apply(x, self.weight, eps)


class LlamaRmsNorm(nn.Module):
    """A list's `rms_norm` with `implementation: composite`: Hugging Face's `LlamaRMSNorm`
    (transformers' code), by hand in f32."""

    def __init__(self, features, eps, elementwise_affine):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features)) if elementwise_affine else None
        self.eps = eps if eps is not None else torch.finfo(torch.float32).eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        if self.weight is None:
            return hidden_states.to(input_dtype)
        return self.weight * hidden_states.to(input_dtype)


class CudaNewGelu(nn.Module):
    """A list's `gelu` with `implementation: composite`: Hugging Face's `NewGELUActivation`
    (transformers' code) under CUDA's autocast policy, which runs `pow` in f32 (a 16-bit input
    cast first; the CPU's autocast leaves it 16-bit). Evaluated in transformers' order: `0.5 * x`,
    the cast, `pow`, ..."""

    def forward(self, x):
        half = 0.5 * x
        wide = x.float() if torch.is_autocast_enabled(x.device.type) else x
        return half * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(wide, 3.0))))


class GatedMlp(nn.Module):
    """A layer list's `gated_mlp`: Llama's MLP, `down_proj(act(gate_proj(x)) * up_proj(x))`."""

    ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "gelu_pytorch_tanh": lambda: nn.GELU("tanh"), "relu": nn.ReLU}

    def __init__(self, features, intermediate_size, activation="silu", bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(features, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(features, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, features, bias=bias)
        self.act_fn = self.ACTIVATIONS[activation]()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ForwardTables:
    """Tables made once a forward and shared by the layers that read them, by key: `made`, what
    this forward has made; `read`, the keys read while a checkpointed region first runs (what it
    is lent). `clear` (a forward hook on the model) drops the forward's."""

    def __init__(self):
        self.made = {}
        self.read = None

    def lookup(self, key, make):
        """The table of `key`, made by `make()` on first use this forward."""
        if self.read is not None:
            self.read.add(key)
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def clear(self, *_):
        self.made.clear()


class RotaryTables(ForwardTables):
    """The cosines and sines of rotary position embedding, made once a forward and shared by
    every attention layer, as Hugging Face's `LlamaModel` makes them (`rotary_emb`): per
    position and head feature, `[positions, head_dim]` in the model's dtype (f32 under
    autocast); the layers' products keep them for backward."""

    def get(self, positions, head_dim, theta, dtype, device):
        def make():
            with torch.autocast(device.type, enabled=False):
                exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
                angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32),
                                     1.0 / theta ** exponents)
                angles = torch.cat((angles, angles), dim=-1)
                return angles.cos().to(dtype), angles.sin().to(dtype)

        return self.lookup((positions, head_dim, theta, dtype), make)


class Checkpointed(nn.Module):
    """A layer list's `checkpoint`: its layers under `torch.utils.checkpoint` (non-reentrant,
    early stop). What the model's forward shares with them and they read (rotary tables, causal
    masks) is lent to the region as Hugging Face passes it to each checkpointed layer: an
    argument the checkpoint's frame holds, read again by the recomputation rather than made
    anew. Tables made for layers outside the region are not lent."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def shared(self):
        """The shared-table objects the layers read."""
        found = {}
        for layer in self.body.modules():
            for table in (getattr(layer, "rotary", None), getattr(layer, "masks", None)):
                if table is not None:
                    found[id(table)] = table
        return list(found.values())

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.run, x, {}, use_reentrant=False)

    def run(self, x, lent):
        tables = self.shared()
        if not lent:
            for table in tables:
                table.read = set()
            y = self.body(x)
            lent.update({id(t): {key: t.made[key] for key in t.read} for t in tables})
            for table in tables:
                table.read = None
            return y
        outer = [(t, t.made) for t in tables]
        for table in tables:
            table.made = dict(lent.get(id(table), {}))
        try:
            return self.body(x)
        finally:
            for table, made in outer:
                table.made = made


def rotate_half(x):
    """Hugging Face's `rotate_half`: the head's second half negated, then its first half."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SelfAttention(nn.Module):
    """A layer list's `self_attention`: Llama's attention (`q_proj`, `k_proj`, `v_proj`, `o_proj`),
    the heads viewed out of the projections, rotary position embedding on the queries and keys
    as Hugging Face's `apply_rotary_pos_emb` computes it (with `rope_theta`), and SDPA's fused
    path between them (`enable_gqa` where key/value heads are shared: nothing repeated).

    `dropout` follows CUDA: its fused kernels (FlashAttention-2, memory-efficient attention) keep
    no mask, only the Philox seed and offset as host scalars, so SDPA's GPU memory is that of
    `dropout_p=0`; the CPU would fall back to the math path, which CUDA never takes here."""

    def __init__(self, features, num_heads, num_kv_heads=None, head_dim=None, causal=False, bias=True,
                 rope_theta=None, dropout=0.0, output_bias=None, implementation="sdpa", fused_qkv=False,
                 upcast_softmax=True):
        super().__init__()
        self.heads, self.kv_heads = num_heads, num_kv_heads or num_heads
        self.head_dim, self.causal = head_dim or features // num_heads, causal
        self.widths = [self.heads * self.head_dim] + [self.kv_heads * self.head_dim] * 2
        if fused_qkv:
            self.c_attn = nn.Linear(features, sum(self.widths), bias=bias)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(features, w, bias=bias) for w in self.widths)
        self.o_proj = nn.Linear(self.heads * self.head_dim, features, bias=bias if output_bias is None else output_bias)
        self.rope_theta = rope_theta
        self.rotary = None  # the model's RotaryTables, given by `share_model_tables`
        self.dropout, self.eager, self.upcast_softmax = dropout, implementation == "eager", upcast_softmax
        self.masks = None  # the model's CausalMasks (eager and causal), given by `share_model_tables`

    def forward(self, x):
        b, t, _ = x.shape

        def heads(y, n):
            return y.view(b, t, n, self.head_dim).transpose(1, 2)

        if hasattr(self, "c_attn"):  # GPT-2's: one projection, split
            q, k, v = self.c_attn(x).split(self.widths, dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = heads(q, self.heads), heads(k, self.kv_heads), heads(v, self.kv_heads)
        if self.rope_theta is not None:
            cos, sin = self.rotary.get(t, self.head_dim, self.rope_theta, self.o_proj.weight.dtype, x.device)
            q, k = (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
        if self.eager:
            mask = self.masks.get(b, t, self.o_proj.weight.dtype, x.device) if self.causal else None
            dropout = self.dropout if self.training else 0.0
            o = eager_attention(q, k, v, mask, dropout, self.heads // self.kv_heads, self.upcast_softmax)
            return self.o_proj(o.reshape(b, t, -1))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=self.causal,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class CausalMasks(ForwardTables):
    """The additive causal mask of eager attention, made once a forward and shared by every
    layer, as Hugging Face's `create_causal_mask` makes it for `attn_implementation="eager"`:
    `[batch, 1, positions, positions]`, 0 where a position may attend and the type's minimum
    where not, in the model's dtype (f32 under autocast)."""

    def get(self, batch, positions, dtype, device):
        def make():
            allowed = torch.ones(positions, positions, dtype=torch.bool, device=device).tril()
            allowed = allowed[None, None].expand(batch, 1, positions, positions)
            zero = torch.tensor(0.0, dtype=dtype, device=device)
            return torch.where(allowed, zero, torch.finfo(dtype).min)

        return self.lookup((batch, positions, dtype), make)


def repeat_kv(x, groups):
    """Hugging Face's `repeat_kv`: each key/value head repeated for the query heads it serves (a
    copy), or `x` itself for multi-head attention."""
    if groups == 1:
        return x
    b, heads, t, d = x.shape
    return x[:, :, None].expand(b, heads, groups, t, d).reshape(b, heads * groups, t, d)


def cuda_softmax_f32(w, softmax=F.softmax):
    """`F.softmax(w, dim=-1, dtype=torch.float32)` as CUDA runs it: an f16 input goes straight
    into the f32 kernel (`_softmax(half_to_float=True)`), any other is converted first; the CPU
    converts f16 too."""
    if w.dtype == torch.float16:
        return torch._softmax(w, -1, True)
    return softmax(w, dim=-1, dtype=torch.float32)


def eager_attention(q, k, v, mask, dropout, groups, upcast_softmax=True):
    """Hugging Face's `eager_attention_forward` (Llama's, which most decoders share) over
    `[batch, heads, positions, head_dim]` views: the keys and values repeated for grouped-query
    attention, the scores materialized and scaled, the mask added, the softmax in f32 (saved)
    cast back to the queries' type (GPT-2's without `upcast_softmax`: in the scores' type, f32
    under CUDA's autocast, cast to the values' type), dropout on the probabilities (one-byte
    mask, as on CUDA), their product with the values, and the heads moved back beside each
    position (a copy)."""
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    if mask is not None:
        w = w + mask
    if not upcast_softmax:
        autocast = torch.is_autocast_enabled(w.device.type)
        w = F.softmax(w.float() if autocast else w, dim=-1).type(v.dtype)
    else:
        w = cuda_softmax_f32(w).to(q.dtype)
    if dropout:
        w = torch.native_dropout(w, dropout, True)[0]
    return torch.matmul(w, v).transpose(1, 2).contiguous()


def share_model_tables(model):
    """One [`RotaryTables`] for every attention layer of `model` with rotary embedding and one
    [`CausalMasks`] for every causal eager one, remade each forward."""
    attention = [m for m in model.modules() if isinstance(m, SelfAttention)]
    rotary = [m for m in attention if m.rope_theta is not None]
    masked = [m for m in attention if m.eager and m.causal]
    for layers, field, shared in [(rotary, "rotary", RotaryTables()), (masked, "masks", CausalMasks())]:
        for layer in layers:
            setattr(layer, field, shared)
        if layers:
            model.register_forward_hook(shared.clear)


class PatchEmbedding(nn.Module):
    """A layer list's `patch_embedding`, as torchvision's ViT makes its tokens: `conv_proj`, its
    output read as tokens, the class token before them, the position embedding added."""

    def __init__(self, shape, embedding_dim, patch_size):
        super().__init__()
        channels, height, width = shape
        self.conv_proj = nn.Conv2d(channels, embedding_dim, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, embedding_dim))
        patches = (height // patch_size) * (width // patch_size)
        self.pos_embedding = nn.Parameter(torch.zeros(1, patches + 1, embedding_dim))
        self.patch_values = patches * embedding_dim

    def copied_values(self, precision):
        """Values a sample of the patches' gradient headroom transposes where PyTorch passes a
        view on (under autocast both cast it to half)."""
        return 0 if precision in ("bf16-mixed", "16-mixed") else self.patch_values

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x)
        x = x.reshape(n, x.shape[1], -1).permute(0, 2, 1)
        # CUDA's autocast does not wrap `cat` (the CPU's promotes its inputs to f32 copies
        # first): 16-bit patches and the f32 class token concatenate by type promotion.
        with torch.autocast(x.device.type, enabled=False):
            x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return x + self.pos_embedding


class FirstToken(nn.Module):
    """A layer list's `first_token`: `x[:, 0]`."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def copied_values(self, precision):
        """Values a sample headroom copies where PyTorch selects a view."""
        return self.features

    def forward(self, x):
        return x[:, 0]


class MeanPool(nn.Module):
    """A layer list's `mean_pool`: `x.mean(dim=1)`, in its input's type as CUDA's autocast leaves
    it (the CPU's autocast may run `mean` in f32)."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return x.mean(dim=1)


class PositionalEmbedding(nn.Module):
    """A layer list's `positional_embedding`, as Hugging Face's GPT-2 adds its `wpe`: the
    positions' ids (int64), their rows of the table, and the sum with the batch."""

    def __init__(self, max_positions, features):
        super().__init__()
        self.wpe = nn.Embedding(max_positions, features)

    def forward(self, x):
        position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        return x + self.wpe(position_ids)


class Residual(nn.Module):
    """A layer list's `residual` block: `body(x)`, then `shortcut(x)` added to it, into a new
    tensor or (`inplace`) into the body's output, as torchvision's `out += identity`."""

    def __init__(self, body, shortcut, inplace):
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.inplace = inplace

    def forward(self, x):
        out = self.body(x)
        carried = self.shortcut(x)
        if self.inplace:
            out += carried
            return out
        return out + carried


def layer_list(model_spec):
    """The job's model as a layer list: `model.layers` (with `gradient_checkpointing`, each
    top-level residual block checkpointed, as headroom reads a list checkpointed nowhere), or
    the shorthand's MLP written as one."""
    if "layers" in model_spec:
        layers = model_spec["layers"]
        if not model_spec.get("gradient_checkpointing") or any("checkpoint" in l for l in layers):
            return layers
        return [{"checkpoint": {"layers": [l]}} if "residual" in l else l for l in layers]
    activation = model_spec.get("activation", "relu")
    activation = {"gelu": {"gelu": {"approximate": "tanh"}}}.get(activation, {activation: {}})
    layers = [{"flatten": {}}]
    for i, hidden in enumerate(model_spec.get("hidden_layers", [])):
        layers += [{"linear": {"out_features": hidden}}, activation]
        dropout = model_spec.get("dropout", [])
        if i < len(dropout) and dropout[i] > 0:
            layers.append({"dropout": {"p": dropout[i]}})
    return layers + [{"linear": {"out_features": model_spec["num_classes"]}}]


def module(kind, args, shape, vocab=None):
    """The module of one layer over samples of `shape` (residual blocks aside); `vocab` for an
    embedding over token ids."""
    channels = shape[0]
    if kind == "embedding":
        return nn.Embedding(vocab, args["embedding_dim"], padding_idx=args.get("padding_idx"))
    if kind == "positional_embedding":
        return PositionalEmbedding(args.get("max_positions", shape[0]), shape[-1])
    if kind == "conv2d":
        return nn.Conv2d(
            channels,
            args["out_channels"],
            args["kernel_size"],
            args.get("stride", 1),
            args.get("padding", 0),
            args.get("dilation", 1),
            args.get("groups", 1),
            bias=args.get("bias", True),
        )
    if kind == "max_pool2d":
        k = args["kernel_size"]
        return nn.MaxPool2d(k, args.get("stride") or k, args.get("padding", 0), args.get("dilation", 1),
                            ceil_mode=args.get("ceil_mode", False))
    if kind == "avg_pool2d":
        k = args["kernel_size"]
        return nn.AvgPool2d(k, args.get("stride") or k, args.get("padding", 0), args.get("ceil_mode", False),
                            args.get("count_include_pad", True))
    if kind == "adaptive_avg_pool2d":
        return nn.AdaptiveAvgPool2d(tuple(args["output_size"]) if isinstance(args["output_size"], list)
                                    else args["output_size"])
    if kind == "global_avg_pool2d":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if kind in ("batch_norm2d", "batch_norm1d"):
        norm = nn.BatchNorm2d if kind == "batch_norm2d" else nn.BatchNorm1d
        return norm(channels, eps=args.get("eps", 1e-5), momentum=args.get("momentum", 0.1),
                    affine=args.get("affine", True))
    if kind == "dropout":
        return GpuDropout(args.get("p", 0.5))
    if kind == "flatten":
        return nn.Flatten()
    if kind == "identity":
        return nn.Identity()
    if kind == "gated_mlp":
        return GatedMlp(shape[-1], **args)
    if kind == "self_attention":
        return SelfAttention(shape[-1], **args)
    if kind == "patch_embedding":
        return PatchEmbedding(shape, **args)
    if kind == "first_token":
        return FirstToken(shape[-1])
    if kind == "mean_pool":
        return MeanPool()
    if kind == "layer_norm":
        return CudaLayerNorm(shape, eps=args.get("eps", 1e-5), elementwise_affine=args.get("elementwise_affine", True),
                             bias=args.get("bias", True))
    if kind == "rms_norm" and args.get("implementation") == "composite":
        return LlamaRmsNorm(shape[-1], args.get("eps"), args.get("elementwise_affine", True))
    if kind == "rms_norm":
        return CudaRmsNorm(shape[-1], eps=args.get("eps"), elementwise_affine=args.get("elementwise_affine", True))
    if kind == "linear":
        linear = nn.Linear(shape[-1], args["out_features"], bias=args.get("bias", True))
        linear.tied = args.get("tied", False)  # its weight becomes the embedding's: `tie_weights`
        return linear
    if kind == "relu":
        return nn.ReLU(args.get("inplace", False))
    if kind == "relu6":
        return nn.ReLU6(args.get("inplace", False))
    if kind == "leaky_relu":
        return nn.LeakyReLU(args.get("negative_slope", 0.01), args.get("inplace", False))
    if kind == "gelu":
        if args.get("implementation") == "composite":
            return CudaNewGelu()
        return nn.GELU(approximate=args.get("approximate", "none"))
    if kind == "tanh":
        return nn.Tanh()
    if kind == "sigmoid":
        return nn.Sigmoid()
    if kind == "silu":
        return nn.SiLU()
    raise SystemExit(f"the memory check does not build {kind} layers")


def output_shape(layer, shape):
    """What `layer` (a throwaway copy) makes of one sample of `shape`, as PyTorch computes it
    (on two samples: batch norm needs more than one value per channel; token ids for an
    embedding)."""
    dtype = torch.long if isinstance(layer, nn.Embedding) else None
    share_model_tables(layer)
    with torch.no_grad():
        return list(layer(torch.zeros(2, *shape, dtype=dtype)).shape[1:])


def modules(specs, shape, vocab=None):
    """The modules of a layer list over samples of `shape` (on the default device, in the
    default dtype; token ids below `vocab` when given), and the shape they pass on."""
    layers = []
    for spec in specs:
        ((kind, args),) = spec.items()
        if kind == "residual":
            body, out = modules(args["layers"], shape)
            shortcut, _ = modules(args.get("shortcut", []), shape)
            layer = Residual(nn.Sequential(*body), nn.Sequential(*shortcut), args.get("inplace", False))
        elif kind == "frozen":
            body, out = modules(args["layers"], shape, vocab)
            layer = nn.Sequential(*body).requires_grad_(False)
        elif kind == "checkpoint":
            body, out = modules(args["layers"], shape, vocab)
            layer = Checkpointed(nn.Sequential(*body))
        else:
            layer = module(kind, args, shape, vocab)
            out = output_shape(module(kind, args, shape, vocab), shape)
        layers.append(layer)
        shape = out
    return layers, shape


# Layer kinds that hold layer lists.
CONTAINERS = ("residual", "frozen", "checkpoint")


TORCHVISION = {
    "resnet18-imagenet": "resnet18",
    "resnet50-imagenet": "resnet50",
    "vgg11-bn-imagenet": "vgg11_bn",
    "mobilenet-v2-imagenet": "mobilenet_v2",
}


def gpu_dropout(model):
    """`model` with every `nn.Dropout` replaced by [`GpuDropout`]."""
    for name, child in model.named_children():
        if isinstance(child, nn.Dropout):
            setattr(model, name, GpuDropout(child.p))
        else:
            gpu_dropout(child)
    return model


def build(job, device, torchvision_name=None):
    """The job's network (torchvision's own when named) and its optimizer (foreach), on
    `device`, in the job's precision."""
    dtype = torch.bfloat16 if job.get("precision") == "bf16-true" else torch.float32
    # Made where and as they train: fake parameters cannot be moved afterwards.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if "huggingface" in job["model"]:
                model = hugging_face_model(job)
            elif torchvision_name:
                import torchvision

                classes = job["model"]["num_classes"]
                model = gpu_dropout(getattr(torchvision.models, torchvision_name)(num_classes=classes))
            else:
                layers, out = modules(layer_list(job["model"]), sample_shape(job), vocab(job))
                model = nn.Sequential(*layers)
                # One label a sample, or one a position of the logits' leading dimensions.
                model.label_shape = out[:-1]
                tie_weights(model)
                share_model_tables(model)
                if "lora" in job["model"]:
                    model = with_lora(model, job["model"]["lora"])
                if job.get("sharding") == "fsdp":
                    fully_shard_blocks(model, job.get("reshard_after_forward", True))
    finally:
        torch.set_default_dtype(default_dtype)
    name = job["optimizer"]["name"]
    lr = job["optimizer"].get("learning_rate", 0.01 if name.startswith("sgd") else 0.001)
    params = model.parameters()
    if name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, foreach=True)
    elif name == "sgd_momentum":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True)
    elif name == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, foreach=True)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, foreach=True)
    else:
        raise SystemExit(f"unknown optimizer {name}")
    return model, optimizer


def fully_shard_blocks(model, reshard_after_forward):
    """`fully_shard` on every top-level residual block and checkpoint of the list (a checkpointed
    block wrapped as torchtitan wraps it: FSDP outside the checkpoint), then on the model, as
    headroom's `"sharding": "fsdp"` reads a layer list, over the device mesh `fsdp_mesh` made
    (before the fake mode: FSDP needs a process group, here a fake one); the blocks with
    `reshard_after_forward` as the job says (the model's own keeps PyTorch's choice for it)."""
    from torch.distributed.fsdp import fully_shard

    listed = model.base_model.model if hasattr(model, "base_model") else model  # peft's
    for layer in listed:
        if isinstance(layer, (Residual, Checkpointed)):
            fully_shard(layer, mesh=FSDP_MESH[0], reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=FSDP_MESH[0])


#: The device mesh of the fake process group the FSDP jobs run in, made by `fsdp_mesh`.
FSDP_MESH = [None]


def fsdp_mesh(world):
    """A fake process group of `world` ranks (this process rank 0) and its 1-D CPU mesh, made
    outside the fake mode as FSDPMemTracker needs; remade when the world size changes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized() and dist.get_world_size() == world:
        return
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    FSDP_MESH[0] = init_device_mesh("cpu", (world,))


#: Which linear layers of the builder's modules each LoRA target name means.
LORA_OWNERS = {"q_proj": "SelfAttention", "k_proj": "SelfAttention", "v_proj": "SelfAttention",
               "o_proj": "SelfAttention", "gate_proj": "GatedMlp", "up_proj": "GatedMlp", "down_proj": "GatedMlp"}


def with_lora(model, lora):
    """`model` as peft's `get_peft_model` makes it with the job's `model.lora`: every parameter
    frozen, vanilla LoRA adapters on the linear layers named (peft's own modules). The names a
    job gives (`q_proj`, ..., `linear` for the list's own linear layers, `all-linear`) become
    the modules' full names; the head (the list's last layer) is never adapted."""
    import peft

    targets = lora.get("target_modules", ["q_proj", "v_proj"])
    everything = targets == "all-linear"
    targets = [targets] if isinstance(targets, str) else targets
    head = str(len(model) - 1)
    owners = {name: type(module).__name__ for name, module in model.named_modules()}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name == head or getattr(module, "tied", False):
            continue
        parent, _, leaf = name.rpartition(".")
        kind = leaf if LORA_OWNERS.get(leaf) == owners.get(parent) else "linear"
        if everything or kind in targets:
            names.append(name)
    # A pattern peft matches against whole names (a list would match their suffixes too).
    pattern = "|".join(re.escape(name) for name in names)
    config = peft.LoraConfig(r=lora.get("r", 8), lora_alpha=lora.get("lora_alpha", 8),
                             lora_dropout=lora.get("lora_dropout", 0.0), target_modules=f"^(?:{pattern})$")
    # peft moves each new adapter to its base layer's device and dtype with `Module.to`, whose
    # parameter swap FakeTensorMode refuses; `build` makes them there already (under its default
    # device and dtype), so the moves are skipped.
    with unittest.mock.patch.object(nn.Module, "to", lambda module, *_, **__: module):
        return gpu_dropout(peft.get_peft_model(model, config))


def vision_config(job):
    """The Hugging Face config of an image classifier's job (`model_type` `vit`), else None."""
    config = job["model"].get("huggingface")
    return config if config and config.get("model_type") == "vit" else None


def sample_shape(job):
    """One sample's shape: `input_shape` (a ViT config's image), or `[sequence_length]` token
    ids."""
    if config := vision_config(job):
        side = config.get("image_size", 224)
        return [config.get("num_channels", 3), side, side]
    tokens = job["model"].get("tokens")
    return [tokens["sequence_length"]] if tokens else list(job["model"]["input_shape"])


def vocab(job):
    """The vocabulary of a job over token ids (a config's own), else None."""
    if vision_config(job):
        return None
    if "huggingface" in job["model"]:
        return job["model"]["huggingface"]["vocab_size"]
    tokens = job["model"].get("tokens")
    return tokens["vocab_size"] if tokens else None


def classes(job):
    """The classes of the loss: the vocabulary of a language model read from its config, an
    image classifier's labels (`id2label`'s, else `num_labels`, else transformers' 2)."""
    if config := vision_config(job):
        return len(config.get("id2label") or {}) or config.get("num_labels", 2)
    return vocab(job) if "huggingface" in job["model"] else job["model"]["num_classes"]


def hugging_face_model(job):
    """transformers' own language model for a job given by its config (`model.huggingface`):
    built from the config (no weights; SDPA unless the config says `eager`), LoRA adapters by
    peft, gradient checkpointing as `gradient_checkpointing_enable()` (non-reentrant), each
    decoder layer and then the model `fully_shard`ed, as the job asks."""
    import peft
    import transformers
    import transformers.masking_utils
    from transformers.initialization import no_init_weights

    # Without a key/value cache (gradient checkpointing, `use_cache: false`) transformers reads
    # the position ids to see whether sequences are packed; fake tensors have no values to
    # read, so it would build the causal mask as if they were (and SDPA would leave its causal
    # path). Real training's ids, `arange` a sequence, are not packed: the answer it reads.
    transformers.masking_utils.find_packed_sequence_indices = lambda position_ids: None
    config = dict(job["model"]["huggingface"])
    implementation = config.pop("attn_implementation", "sdpa")
    config = transformers.AutoConfig.for_model(**config)
    vision = vision_config(job) is not None
    auto = transformers.AutoModelForImageClassification if vision else transformers.AutoModelForCausalLM
    # No initial values for ViT: its truncated normal reads them, which fake tensors have not
    # (a decoder's initialization also ties its head, which this would skip).
    with no_init_weights() if vision else contextlib.nullcontext():
        model = auto.from_config(config, attn_implementation=implementation, dtype=torch.get_default_dtype())
    model.train()
    if vision:
        patches = (config.image_size // config.patch_size) ** 2
        model.label_shape = []
        positions = patches + 1
        vit_as_headroom_copies(model, patches * config.hidden_size, config.hidden_size)
    else:
        model.label_shape = sample_shape(job)
        positions = sample_shape(job)[0]
    under_cuda_policy(model, positions)
    model.forward = with_cuda_softmax(model.forward)
    if job["model"].get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if "lora" in job["model"]:
        lora = job["model"]["lora"]
        lora_config = peft.LoraConfig(r=lora.get("r", 8), lora_alpha=lora.get("lora_alpha", 8),
                                      lora_dropout=lora.get("lora_dropout", 0.0),
                                      target_modules=lora.get("target_modules", ["q_proj", "v_proj"]))
        # As `with_lora`: the adapters are made where they train already.
        with unittest.mock.patch.object(nn.Module, "to", lambda module, *_, **__: module):
            model = peft.get_peft_model(model, lora_config)
    if job.get("sharding") == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_decoder().layers:
            fully_shard(layer, mesh=FSDP_MESH[0], reshard_after_forward=job.get("reshard_after_forward", True))
        fully_shard(model, mesh=FSDP_MESH[0])
    return model


def vit_as_headroom_copies(model, patch_values, features):
    """transformers' ViT marked where headroom's kernels copy what PyTorch views (as the list's
    `PatchEmbedding` and `FirstToken`): the patches' gradient (`patch_values` a sample, unless
    autocast casts it) and the class token's `features`."""
    model.vit.embeddings.patch_embeddings.copied_values = \
        lambda precision: 0 if precision in ("bf16-mixed", "16-mixed") else patch_values
    model.classifier.copied_values = lambda precision: features


def under_cuda_policy(model, positions):
    """transformers' modules whose autocast on the CPU differs from CUDA's, made CUDA's:
    `nn.LayerNorm` as [`CudaLayerNorm`] over `positions` rows a sample (its parameters kept),
    `NewGELUActivation` as [`CudaNewGelu`]."""
    import transformers.activations

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                norm = CudaLayerNorm([positions, *child.normalized_shape], eps=child.eps,
                                     elementwise_affine=child.elementwise_affine, bias=child.bias is not None)
                norm.weight, norm.bias = child.weight, child.bias
                setattr(parent, name, norm)
            elif isinstance(child, transformers.activations.NewGELUActivation):
                setattr(parent, name, CudaNewGelu())
            elif type(child).__name__ == "ViTEmbeddings":
                child.forward = without_autocast_cat(child.forward)


def with_cuda_softmax(forward):
    """`forward` with `F.softmax(w, dtype=torch.float32)` as CUDA runs it ([`cuda_softmax_f32`]:
    an f16 `w` read by the f32 kernel, not converted first as on the CPU)."""
    softmax = F.softmax

    def cuda_softmax(input, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and dim in (-1, input.dim() - 1):
            return cuda_softmax_f32(input)
        return softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    def wrapped(*args, **kwargs):
        with unittest.mock.patch.object(F, "softmax", cuda_softmax):
            return forward(*args, **kwargs)

    return wrapped


def without_autocast_cat(forward):
    """`forward` with `torch.cat` outside autocast: CUDA's autocast does not wrap `cat`, the
    CPU's promotes its inputs to f32 copies first (ViT's class token before its patches)."""
    cat = torch.cat

    def cat_as_cuda(tensors, *args, **kwargs):
        with torch.autocast(tensors[0].device.type, enabled=False):
            return cat(tensors, *args, **kwargs)

    def wrapped(*args, **kwargs):
        with unittest.mock.patch.object(torch, "cat", cat_as_cuda):
            return forward(*args, **kwargs)

    return wrapped


def tie_weights(model):
    """Every `tied` linear layer's weight made the first embedding's table, as Hugging Face's
    `tie_weights` does: one parameter, which `model.parameters()` lists once."""
    tied = [m for m in model.modules() if getattr(m, "tied", False)]
    if tied:
        table = next(m for m in model.modules() if isinstance(m, nn.Embedding)).weight
        for linear in tied:
            linear.weight = table


def train_step(job, model, optimizer, batch, device, after_backward=lambda: None):
    """One training step as the module docstring writes it; `after_backward` is called between
    backward and the optimizer's part (the unscaling and the update). Over token ids the loss
    is a language model's: `F.cross_entropy(logits.view(-1, classes), labels.view(-1))`, or for
    transformers' own model its own, `model(input_ids=x, labels=y).loss`."""
    precision = job.get("precision", "32-true")
    label_classes = classes(job)
    if vocab(job):
        x = torch.randint(0, vocab(job), (batch, *sample_shape(job)), device=device)
    else:
        x = torch.randn(batch, *sample_shape(job), device=device)
    y = torch.randint(0, label_classes, (batch, *getattr(model, "label_shape", [])), device=device)
    if precision == "bf16-true" and not vocab(job):
        x = x.to(torch.bfloat16)

    def loss_of():
        if vision_config(job):
            return model(pixel_values=x, labels=y).loss
        if "huggingface" in job["model"]:
            return model(input_ids=x, labels=y).loss
        return F.cross_entropy(model(x).reshape(-1, label_classes), y.reshape(-1))

    if precision in ("bf16-mixed", "16-mixed"):
        half = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        with torch.autocast(device_type=torch.device(device).type, dtype=half):
            loss = loss_of()
    else:
        loss = loss_of()
    if precision == "16-mixed":
        scale = torch.full((), 65536.0, device=device)
        (loss * scale).backward()
        found_inf = torch.zeros((), device=device)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
    else:
        loss.backward()
    after_backward()
    if precision == "16-mixed":
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, scale.reciprocal())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def frozen_aware_tracker():
    """MemTracker that takes frozen parameters: it hooks every parameter's gradient as a module's
    forward begins, and PyTorch refuses a hook on a tensor that does not require grad; this one
    hooks the trained parameters only, with MemTracker's own hooks."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if not install_grad_hooks:
                return memory

            def on_grad(grad):
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            for param in module.parameters():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(on_grad),
                        param.register_post_accumulate_grad_hook(lambda p: on_grad(p.grad)),
                    )
            return memory

    return Tracker()


def pytorch_peak_fake(job, batch, torchvision_name=None):
    """The step's peak under FakeTensorMode, by MemTracker's categories, in bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sharded = job.get("sharding") == "fsdp"
    if sharded:
        fsdp_mesh(job["world_size"])
    with FakeTensorMode():
        model, optimizer = build(job, "cpu", torchvision_name)
        train_step(job, model, optimizer, batch, "cpu")
        if sharded:
            # DTensor's sharding propagation runs an op it has not cached in this fake mode, on
            # fake tensors of the global shapes, and FSDPMemTracker counts them for the op's
            # moment. SGD momentum's first step clones; its `_foreach_mul_` on the buffers first
            # runs in the second: a second untracked step caches it.
            train_step(job, model, optimizer, batch, "cpu")
            from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

            tracker = FSDPMemTracker(model, optimizer)
        else:
            tracker = frozen_aware_tracker()
            tracker.track_external(model, optimizer)
        before_update = {}
        with tracker:
            train_step(job, model, optimizer, batch, "cpu",
                       lambda: before_update.update(by_category(tracker.get_tracker_snapshot("peak"))))
        named = by_category(tracker.get_tracker_snapshot("peak"))
        counts = {"parameters": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        layer_norms = [m for m in model.modules() if isinstance(m, CudaLayerNorm)]
        views = [m.copied_values for m in model.modules() if hasattr(m, "copied_values")]
    # On CUDA batch norm and layer norm save their statistics in f32 (their accumulation type);
    # here, over 16-bit values, in 16-bit: at most 4 bytes a channel (a row) less than the
    # profile, which models CUDA.
    precision = job.get("precision", "32-true")
    allowance = 4 * sum(m.num_features for m in norms) if precision != "32-true" else 0
    if precision == "bf16-true":
        allowance += 4 * batch * sum(m.positions for m in layer_norms)
    # Where PyTorch passes a view on, headroom's kernels copy it (the first token; the patch
    # tokens' gradient in the convolution's layout, which CUDA's convolution_backward makes
    # contiguous inside the operation): at most those values a sample more than MemTracker sees.
    value_bytes = 2 if precision == "bf16-true" else 4
    allowance += value_bytes * batch * sum(v(precision) for v in views)
    return {"total": named["total"], "allowance": allowance, "counts": counts,
            "peak_in_optimizer": named["total"] > before_update["total"],
            **{k: v for k, v in named.items() if k != "total"}}


def by_category(snapshot):
    """A MemTracker snapshot of one device as `{category: bytes}` (`total` among them)."""
    (categories,) = snapshot.values()
    return {str(k).rsplit(".", 1)[-1].lower(): v for k, v in categories.items()}


def pytorch_peak_cuda(job, batch, torchvision_name=None):
    """The step's peak on the GPU: the caching allocator's allocated and reserved bytes, less
    what was allocated before the model (cuBLAS's workspace, made by a first product)."""
    torch.cuda.empty_cache()
    warm = torch.ones(8, 8, device="cuda")
    (warm @ warm).sum().item()
    del warm
    baseline = torch.cuda.memory_allocated()
    model, optimizer = build(job, "cuda", torchvision_name)
    train_step(job, model, optimizer, batch, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_step(job, model, optimizer, batch, "cuda")
    torch.cuda.synchronize()
    peak = {
        "total": torch.cuda.max_memory_allocated() - baseline,
        "reserved": torch.cuda.max_memory_reserved(),
    }
    del model, optimizer
    torch.cuda.empty_cache()
    return peak


class Refused(Exception):
    """headroom refused a job."""


def headroom_peak(binary, job, batch, traced):
    """headroom's PyTorch profile at `batch`: the estimate's JSON."""
    job = dict(job, framework="pytorch")
    command = [binary, "estimate", "-", "--batch-size", str(batch), "--json"]
    output = subprocess.run(
        command + (["--traced"] if traced else []),
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
    )
    if output.returncode != 0:
        raise Refused(output.stderr.strip())
    return json.loads(output.stdout)


def within(ours, theirs, cuda, allowance=0):
    """Whether `ours` is close enough to `theirs`: within 0.1% or 1 KiB, and `allowance` bytes
    above it (3% on a GPU)."""
    if cuda:
        return abs(ours - theirs) <= 64 or (theirs > 0 and CUDA_BAND[0] <= ours / theirs <= CUDA_BAND[1])
    band = max(SLACK_BYTES, RELATIVE * theirs)
    return -band <= ours - theirs <= band + allowance


def compare(binary, name, job, batch, cuda, torchvision_name=None):
    """One row: the totals and the categories that mean the same on both sides."""
    theirs = pytorch_peak_cuda(job, batch, torchvision_name) if cuda else pytorch_peak_fake(job, batch, torchvision_name)
    estimate = headroom_peak(binary, job, batch, traced=not cuda)
    memory = estimate["memory"]
    ours_total = estimate["pytorch_cuda_bytes"] if cuda else memory["total"]
    checks = {"total": (ours_total, theirs["total"])}
    # Categories are compared at each side's peak, so only where both peaks fall in the same
    # part of the step: a total within the band can peak in forward on one side and in the
    # optimizer step on the other (batch norm's statistics, f32 on CUDA and 16-bit here, are
    # enough to move it), and then each side's categories describe a different moment.
    same_moment = (memory.get("peak_at") == "optimizer") == theirs.get("peak_in_optimizer")
    if not cuda and same_moment:
        # MemTracker calls a gradient a temporary until autograd has accumulated it, and the
        # peak often falls between the two: gradients, activations, the batch and temporaries
        # are compared together. Mixed precision counts autocast's weight copies with the
        # parameters here and with what forward made in MemTracker. headroom counts batch
        # norm's running statistics with the parameters, MemTracker as buffers. Under FSDP
        # headroom's parameters are FSDPMemTracker's sharded and unsharded parameters, buffers
        # and all-gather outputs.
        # FSDPMemTracker's own classes move with the moment (an all-gather's output is a
        # temporary at some), so under FSDP the totals and optimizer state are compared.
        params = theirs.get("param", 0) + theirs.get("buffer", 0)
        optimizer = theirs.get("opt", 0)
        checks["optimizer state"] = (memory["optimizer_state"], optimizer)
        sharded = job.get("sharding") == "fsdp"
        if job.get("precision") in ("32-true", "bf16-true") and not sharded:
            checks["parameters"] = (memory["parameters"], params)
            checks["gradients, activations, batch"] = (
                memory["total"] - memory["parameters"] - memory["optimizer_state"],
                theirs["total"] - params - optimizer,
            )
    # The allowance is for what the step holds (not the parameters or optimizer state).
    allowance = {"total": theirs.get("allowance", 0), "gradients, activations, batch": theirs.get("allowance", 0)}
    failed = [k for k, (ours, their) in checks.items() if not within(ours, their, cuda, allowance.get(k, 0))]
    # The parameters, and those that train (peft's "trainable params"), counted alike.
    counted = (estimate["parameter_count"], estimate["trainable_parameter_count"])
    if "counts" in theirs and counted != (theirs["counts"]["parameters"], theirs["counts"]["trainable"]):
        failed.append(f"parameter counts {counted} against {theirs['counts']}")
    return {
        "example": name,
        "precision": job.get("precision", "32-true"),
        "optimizer": job["optimizer"]["name"],
        "batch": batch,
        "pytorch": theirs["total"],
        "reserved": theirs.get("reserved"),
        "headroom": ours_total,
        "difference": ours_total - theirs["total"],
        "ratio": ours_total / theirs["total"] if theirs["total"] else float("nan"),
        "peak_at": memory.get("peak_at"),
        "failed": failed,
        "categories": dict(checks),
    }


def rewrite_attention(layers, change):
    """`layers` with `change(args)` applied to every self-attention's arguments, nested too."""
    def rewrite(spec):
        ((kind, args),) = spec.items()
        if kind == "self_attention":
            return {kind: change(args)}
        if kind in CONTAINERS:
            return {kind: {**args, **{k: [rewrite(s) for s in args[k]] for k in ("layers", "shortcut") if k in args}}}
        return spec
    return [rewrite(spec) for spec in layers]


def fused_multi_query(args):
    """A self-attention's arguments, eager of one key/value head for several query heads made
    fused (`sdpa`)."""
    if args.get("implementation") == "eager" and args.get("num_kv_heads") == 1 and args["num_heads"] > 1:
        return {**args, "implementation": "sdpa"}
    return args


def unfused_qkv(args):
    """A self-attention's arguments with three projections (LoRA does not take a fused one)."""
    return {k: v for k, v in args.items() if k != "fused_qkv"}


def shardable(job):
    """Whether headroom models FSDP over the job: checkpoints only at the top of the list, no
    f32 LoRA adapters in a bf16 model; and whether a block or checkpoint shards apart from the
    root. (With the root alone, FSDPMemTracker holds a
    gradient autograd handed over as a view past the root's reduce-scatter at the end of
    backward, which headroom lets go there; see README, "Sharding with FSDP".)"""
    def nested(specs):
        for spec in specs:
            ((kind, args),) = spec.items()
            yield kind
            if kind in CONTAINERS:
                yield from nested(args["layers"] + args.get("shortcut", []))

    layers = job["model"]["layers"]
    inner = {kind for spec in layers for ((_, args),) in [spec.items()]
             for kind in nested(args.get("layers", []) + args.get("shortcut", []))}
    blocks = any("residual" in spec or "checkpoint" in spec for spec in layers)
    bf16_adapters = "lora" in job["model"] and job.get("precision") == "bf16-true"
    return blocks and not bf16_adapters and "checkpoint" not in inner


def adaptable(layers):
    """The LoRA target names a layer list's linear layers answer to, as headroom reads them: a
    self-attention's projections, a gated MLP's, `linear` for the list's own (not tied), the
    model's head (its last layer) excepted."""
    names = set()

    def walk(specs):
        for spec in specs:
            ((kind, args),) = spec.items()
            if kind == "self_attention":
                names.update(["q_proj", "k_proj", "v_proj", "o_proj"])
            elif kind == "gated_mlp":
                names.update(["gate_proj", "up_proj", "down_proj"])
            elif kind == "linear" and not args.get("tied"):
                names.add("linear")
            elif kind in CONTAINERS:
                walk(args["layers"] + args.get("shortcut", []))

    last = layers[-1:] if "linear" not in layers[-1] else []
    walk(layers[:-1] + last)
    return names


class Generator:
    """Random layer lists over every kind headroom accepts, each one PyTorch trains: shapes are
    followed as PyTorch computes them, and a layer runs in place only where autograd allows it
    (not over a tensor an earlier layer saved, nor over a residual block's input)."""

    ACTIVATIONS = ["relu", "relu6", "leaky_relu", "gelu", "tanh", "sigmoid", "silu"]
    # Layers whose output autograd saves (for their own backward).
    SAVES_OUTPUT = {"relu", "tanh", "sigmoid"}

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.smallest_batch = 1
        self.needs_grad = False
        # Whether the layers being drawn are inside a `frozen` list: their parameters train not.
        self.freezing = False
        # Whether they are inside a `checkpoint`: checkpoints do not nest.
        self.checkpointing = False

    def note_norm(self, shape):
        """Batch norm over `shape`: with one value per channel in a sample, PyTorch refuses to
        train it on one sample ("Expected more than 1 value per channel")."""
        if self.elements(shape[1:]) == 1:
            self.smallest_batch = 2

    def batch(self):
        """A batch size for the last job drawn."""
        sizes = [1, 2, 3, 7, 16, 33, 64, 128, 256, 500, 1024, 2048, 3000]
        return self.rng.choice([b for b in sizes if b >= self.smallest_batch])

    def job(self):
        """A job, a fifth of those with a linear layer to adapt fine-tuned with LoRA."""
        job = self.model_job()
        names = adaptable(job["model"]["layers"])
        if names and self.rng.random() < 0.2:
            job["model"]["lora"] = self.lora(names)
        # headroom refuses eager multi-query attention (it does not follow every copy PyTorch
        # makes of the view repeat_kv makes of one head).
        job["model"]["layers"] = rewrite_attention(job["model"]["layers"], fused_multi_query)
        if "lora" in job["model"]:
            job["model"]["layers"] = rewrite_attention(job["model"]["layers"], unfused_qkv)
        # A fifth of the rest sharded with FSDP over a few ranks (3 pads uneven shards), a
        # third of those with the blocks' parameters kept gathered from forward to backward.
        if shardable(job) and self.rng.random() < 0.2:
            job["sharding"], job["world_size"] = "fsdp", self.rng.choice([2, 3, 4, 8])
            if self.rng.random() < 1 / 3:
                job["reshard_after_forward"] = False
            # At batch 1, FSDPMemTracker holds one gradient more than headroom when every group
            # reduces at the end of backward (README, "Sharding with FSDP"): not drawn.
            self.smallest_batch = max(self.smallest_batch, 2)
        return job

    def lora(self, names):
        """A LoRA configuration over some of `names` (or all of them): rank, alpha and dropout
        drawn, peft's defaults half the time."""
        rng = self.rng
        if rng.random() < 0.3:
            targets = "all-linear"
        else:
            targets = rng.sample(sorted(names), rng.randint(1, len(names)))
        return {"r": rng.randint(1, 16), **self.maybe(lora_alpha=rng.choice([1, 16, 32])),
                **self.maybe(lora_dropout=rng.choice([0.05, 0.1])), "target_modules": targets}

    def model_job(self):
        rng = self.rng
        self.smallest_batch = 1
        # Whether a gradient reaches the tensor the next layer reads (a parameter came before).
        self.needs_grad = False
        kind = rng.random()
        if kind < 0.1:
            return self.transformer_job()
        if kind < 0.15:
            return self.vision_transformer_job()
        if kind < 0.25:
            return self.token_job()
        if kind < 0.6:
            input_shape = [rng.randint(1, 4), rng.randint(4, 20), rng.randint(4, 20)]
        elif kind < 0.8:
            input_shape = [rng.randint(1, 16), rng.randint(1, 48)]
        else:
            input_shape = [rng.randint(1, 48)]
        classes = rng.randint(2, 20)
        layers, shape = self.sequence(input_shape, rng.randint(1, 9))
        if len(shape) > 1:
            layers.append({"flatten": {}})
        layers.append({"linear": {"out_features": classes, **self.maybe(bias=False)}})
        return {
            "model": {"input_shape": input_shape, "num_classes": classes, "layers": layers},
            "optimizer": {"name": rng.choice(OPTIMIZERS)},
            "precision": rng.choice(PRECISIONS),
        }

    def token_job(self):
        """A model over token ids: an embedding, layers over `[positions, features]`, then a
        language model's logits at every position (the vocabulary) or one label a sequence."""
        rng = self.rng
        length, vocab = rng.randint(1, 16), rng.randint(2, 200)
        dim = rng.randint(1, 48)
        embedding = {"embedding_dim": dim, **self.maybe(padding_idx=rng.randint(-vocab, vocab - 1))}
        # A quarter of the time the embedding (and the positions) are frozen, and no gradient
        # reaches the layers' input.
        frozen = rng.random() < 0.25
        self.needs_grad = not frozen
        front = [{"embedding": embedding}]
        if rng.random() < 0.5:
            front.append({"positional_embedding": self.maybe(max_positions=length + rng.randint(0, 8))})
        layers, shape = self.sequence([length, dim], rng.randint(0, 6))
        layers = ([{"frozen": {"layers": front}}] if frozen else front) + layers
        if rng.random() < 0.7:
            classes = vocab
            # Not tied to a frozen table: a frozen head might leave nothing to train.
            tied = shape[-1] == dim and not frozen
            head = {"out_features": vocab, "bias": False, **(self.maybe(tied=True) if tied else {})}
        else:
            classes = rng.randint(2, 20)
            layers.append({"mean_pool": {}} if len(shape) == 2 and rng.random() < 0.3 else {"flatten": {}})
            head = {"out_features": classes, **self.maybe(bias=False)}
        layers.append({"linear": head})
        return {
            "model": {"tokens": {"sequence_length": length, "vocab_size": vocab}, "num_classes": classes,
                      "layers": layers},
            "optimizer": {"name": self.rng.choice(OPTIMIZERS)},
            "precision": self.rng.choice(PRECISIONS),
        }

    def transformer_job(self):
        """A decoder or encoder stack over token ids: learned positions or none, pre-norm blocks of
        self-attention (heads, key/value heads, rotary or not, causal or not) and an MLP (plain or gated), a
        final norm, and a language model's head, tied to the embedding or not."""
        rng = self.rng
        length, vocab = rng.randint(1, 24), rng.randint(2, 300)
        heads = rng.randint(1, 4)
        dim = heads * rng.randint(1, 12)
        self.needs_grad = True
        layers = [{"embedding": {"embedding_dim": dim}}]
        if rng.random() < 0.5:
            layers.append({"positional_embedding": self.maybe(max_positions=length + rng.randint(0, 8))})
        norm = self.stream_norm()
        blocks = []
        for _ in range(rng.randint(1, 3)):
            attention = {"num_heads": heads, **self.attention_args(dim)}
            attention["num_heads"] = heads
            if dim % heads:
                attention.setdefault("head_dim", rng.randint(1, 16))
            if heads % attention.get("num_kv_heads", heads):
                del attention["num_kv_heads"]
            if attention.get("head_dim", dim // heads) % 2:
                attention.pop("rope_theta", None)
            blocks.append({"residual": {"layers": [norm, {"self_attention": attention}]}})
            if rng.random() < 0.5:
                mlp = [{"gated_mlp": {"intermediate_size": rng.randint(1, 4 * dim), **self.maybe(bias=True)}}]
            else:
                mlp = [{"linear": {"out_features": 4 * dim}}, {"gelu": self.gelu_args()},
                       {"linear": {"out_features": dim}}]
            blocks.append({"residual": {"layers": [norm, *mlp]}})
        layers += self.checkpoint_blocks(blocks, 2)
        layers.append(norm)
        frozen = self.freeze_prefix(layers)
        # Not tied to a frozen table: a frozen head might leave nothing to train.
        tied = self.maybe(tied=True) if frozen is layers else {}
        layers = frozen + [{"linear": {"out_features": vocab, "bias": False, **tied}}]
        return {
            "model": {"tokens": {"sequence_length": length, "vocab_size": vocab}, "num_classes": vocab,
                      "layers": layers},
            "optimizer": {"name": rng.choice(OPTIMIZERS)},
            "precision": rng.choice(PRECISIONS),
        }

    def vision_transformer_job(self):
        """A vision transformer: an image cut into patches behind a class token, pre-norm blocks
        (or any layers over the tokens), a final norm, and the class token pooled, the tokens'
        mean, or every token flattened into the head."""
        rng = self.rng
        patch = rng.randint(1, 8)
        input_shape = [rng.randint(1, 4), patch * rng.randint(1, 4), patch * rng.randint(1, 4)]
        heads = rng.randint(1, 4)
        dim = heads * rng.randint(1, 8)
        self.needs_grad = True
        layers = [{"patch_embedding": {"embedding_dim": dim, "patch_size": patch}}]
        tokens = (input_shape[1] // patch) * (input_shape[2] // patch) + 1
        blocks = []
        for _ in range(rng.randint(1, 2)):
            attention = {"num_heads": heads, **self.maybe(num_kv_heads=1), **self.maybe(bias=False)}
            blocks.append({"residual": {"layers": [self.stream_norm(), {"self_attention": attention}]}})
        layers = self.freeze_prefix(layers + self.checkpoint_blocks(blocks, 1))
        # With every block frozen no gradient reaches the layers after them.
        self.needs_grad = len(layers) > 1
        more, shape = self.sequence([tokens, dim], rng.randint(0, 3))
        layers += more + [{"layer_norm": self.layer_norm_args()}]
        layers.append(rng.choice([{"first_token": {}}, {"first_token": {}}, {"mean_pool": {}}, {"flatten": {}}]))
        if len(shape) != 2:
            layers = layers[:-2] + [{"flatten": {}}]
        classes = rng.randint(2, 20)
        layers.append({"linear": {"out_features": classes}})
        return {
            "model": {"input_shape": input_shape, "num_classes": classes, "layers": layers},
            "optimizer": {"name": rng.choice(OPTIMIZERS)},
            "precision": rng.choice(PRECISIONS),
        }

    def gelu_args(self):
        """GELU's arguments: exact, the tanh approximation, or that approximation written out
        (Hugging Face's `NewGELUActivation`)."""
        return self.rng.choice([{}, {"approximate": "tanh"},
                                {"approximate": "tanh", "implementation": "composite"}])

    def maybe(self, **fields):
        """`fields` half the time (a non-default argument), else nothing (the default)."""
        return fields if self.rng.random() < 0.5 else {}

    def sequence(self, shape, length, kept=False):
        """`length` layers over samples of `shape` (the model's input, which may change in place;
        `kept` when an earlier layer saved it)."""
        layers = []
        for _ in range(length):
            for _attempt in range(20):
                layer = self.layer(shape, kept)
                if layer is None:
                    continue
                try:
                    out = self.shape_after(layer, shape)
                except Exception:  # noqa: BLE001 - a shape PyTorch refuses: draw another
                    continue
                if 0 in out or self.elements(out) > 1 << 16:
                    continue
                layers.append(layer)
                ((kind, args),) = layer.items()
                kept = self.keeps(kind, args, kept)
                self.needs_grad |= not self.freezing and (
                    kind in ("conv2d", "linear", "residual", "gated_mlp", "self_attention") or (
                        kind in ("layer_norm", "rms_norm") and args.get("elementwise_affine", True)) or (
                        kind.startswith("batch_norm") and args.get("affine", True)))
                shape = out
                break
        return layers, shape

    @staticmethod
    def elements(shape):
        n = 1
        for s in shape:
            n *= s
        return n

    def keeps(self, kind, args, kept):
        """Whether a layer's output may not change in place: autograd saved it, or it is a view
        of a tensor that may not (`kept`)."""
        if kind in ("flatten", "identity") or (kind == "dropout" and args.get("p", 0.5) == 0):
            return kept
        if kind in ("frozen", "checkpoint"):
            # A checkpoint's frame keeps its input.
            kept = kept or kind == "checkpoint"
            for layer in args["layers"]:
                ((inner, inner_args),) = layer.items()
                kept = self.keeps(inner, inner_args, kept)
            return kept
        return kind in self.SAVES_OUTPUT or (kind != "residual" and args.get("inplace", False))

    def shape_after(self, layer, shape):
        ((kind, args),) = layer.items()
        if kind in CONTAINERS:
            return modules([layer], shape)[1]
        return output_shape(module(kind, args, shape), shape)

    def layer(self, shape, kept):
        rng = self.rng
        image = len(shape) == 3
        kinds = ["activation", "activation", "dropout", "identity", "residual", "norm", "frozen", "checkpoint"]
        kinds += ["conv2d", "conv2d", "conv2d", "max_pool2d", "avg_pool2d", "adaptive", "flatten"] if image else ["linear", "linear"]
        kind = rng.choice(kinds)
        if kind == "activation":
            name = rng.choice(self.ACTIVATIONS)
            args = {}
            if name in ("relu", "relu6", "leaky_relu") and not kept and rng.random() < 0.5:
                args["inplace"] = True
            if name == "leaky_relu":
                args.update(self.maybe(negative_slope=rng.choice([0.2, 0.05])))
            if name == "gelu":
                args.update(self.gelu_args())
            return {name: args}
        if kind == "dropout":
            return {"dropout": {"p": rng.choice([0.0, 0.1, 0.5])}}
        if kind == "identity":
            return {"identity": {}}
        if kind == "flatten":
            return {"flatten": {}}
        if kind == "frozen":
            return self.frozen(shape, kept)
        if kind == "checkpoint":
            return self.checkpoint(shape)
        if kind == "linear" and len(shape) == 2 and rng.random() < 0.5:
            return {"self_attention": self.attention_args(shape[-1])}
        if kind == "linear" and rng.random() < 0.25:
            return {"gated_mlp": {"intermediate_size": rng.randint(1, 64),
                                  **self.maybe(activation=rng.choice(["gelu", "gelu_pytorch_tanh", "relu"])),
                                  **self.maybe(bias=True)}}
        if kind == "norm" and not image and rng.random() < 0.6:
            return {"layer_norm": self.layer_norm_args()}
        if kind == "norm" and not image and rng.random() < 0.3:
            # Without a weight: a learnt one over a 16-bit input (after a linear layer under
            # autocast) is PyTorch's composite path, which headroom refuses.
            return {"rms_norm": {"elementwise_affine": False, **self.maybe(eps=1e-6),
                                 **self.maybe(implementation="composite")}}
        if kind == "norm":
            args = {**self.maybe(affine=False), **self.maybe(eps=1e-3), **self.maybe(momentum=0.01)}
            if not self.needs_grad:
                # Over a tensor no gradient reaches, FakeTensor's batch norm backward still makes
                # the input's gradient (its meta kernel ignores the output mask; the CPU's and
                # CUDA's native kernels do not): such a layer is left to GPU runs.
                args["affine"] = False
            self.note_norm(shape)
            return {"batch_norm2d" if image else "batch_norm1d": args}
        if kind == "linear":
            return {"linear": {"out_features": rng.randint(1, 48), **self.maybe(bias=False)}}
        if kind == "conv2d":
            return {"conv2d": self.conv_args(shape[0])}
        if kind == "max_pool2d":
            k = rng.randint(1, 3)
            dilation = rng.choice([1, 1, 2])
            args = {"kernel_size": k, **self.maybe(stride=rng.randint(1, 3)),
                    **self.maybe(padding=rng.randint(0, (dilation * (k - 1) + 1) // 2)),
                    **self.maybe(ceil_mode=True)}
            if dilation > 1:
                args["dilation"] = dilation
            return {"max_pool2d": args}
        if kind == "avg_pool2d":
            k = rng.randint(1, 3)
            return {"avg_pool2d": {"kernel_size": k, **self.maybe(stride=rng.randint(1, 3)),
                                   **self.maybe(padding=rng.randint(0, k // 2)), **self.maybe(ceil_mode=True),
                                   **self.maybe(count_include_pad=False)}}
        if kind == "adaptive":
            if rng.random() < 0.3:
                return {"global_avg_pool2d": {}}
            size = rng.choice([1, 2, 3, [2, 3], [shape[1], shape[2]]])
            return {"adaptive_avg_pool2d": {"output_size": size}}
        return self.residual(shape)

    def frozen(self, shape, kept):
        """One to three layers whose parameters are frozen (none inside another frozen list)."""
        if self.freezing:
            return None
        self.freezing = True
        try:
            layers, _ = self.sequence(shape, self.rng.randint(1, 3), kept)
        finally:
            self.freezing = False
        return {"frozen": {"layers": layers}} if layers else None

    def checkpoint(self, shape):
        """One to three layers under activation checkpointing (none inside another checkpoint;
        the region's input kept by its frame)."""
        if self.checkpointing:
            return None
        self.checkpointing = True
        try:
            layers, _ = self.sequence(shape, self.rng.randint(1, 3), kept=True)
        finally:
            self.checkpointing = False
        return {"checkpoint": {"layers": layers}} if layers else None

    def checkpoint_blocks(self, blocks, per_layer):
        """A third of the time, `blocks` (residual blocks, `per_layer` to a decoder layer) each
        decoder layer checkpointed, as `gradient_checkpointing_enable()` does, or each block;
        else `blocks` themselves."""
        roll = self.rng.random()
        if roll < 2 / 3:
            return blocks
        size = per_layer if roll < 5 / 6 else 1
        return [{"checkpoint": {"layers": blocks[i:i + size]}} for i in range(0, len(blocks), size)]

    def freeze_prefix(self, layers):
        """A third of the time, `layers` with their first ones (at least one) frozen, as a
        fine-tuning run freezes the embedding and the lower blocks; else `layers` itself."""
        if self.rng.random() >= 1 / 3:
            return layers
        n = self.rng.randint(1, len(layers))
        return [{"frozen": {"layers": layers[:n]}}, *layers[n:]]

    def attention_args(self, features):
        """Self-attention over `features`: heads that split them or a head width of its own,
        grouped-query or not, rotary embedding or not (an even head width), causal or not, with or
        without bias (the output projection's its own or not), with or without dropout, fused or
        eager, its query, key and value one projection (without rotary embedding) or three."""
        rng = self.rng
        heads = rng.choice([h for h in range(1, 9) if features % h == 0] if rng.random() < 0.7 else range(1, 9))
        args = {"num_heads": heads}
        if features % heads != 0 or rng.random() < 0.2:
            args["head_dim"] = rng.randint(1, 32)
        kv_heads = rng.choice([k for k in range(1, heads + 1) if heads % k == 0])
        if kv_heads != heads or rng.random() < 0.2:
            args["num_kv_heads"] = kv_heads
        if args.get("head_dim", features // heads) % 2 == 0:
            args.update(self.maybe(rope_theta=rng.choice([10000.0, 500000.0])))
        args.update(self.maybe(dropout=rng.choice([0.1, 0.5])))
        args.update(self.maybe(output_bias=rng.random() < 0.5))
        args.update(self.maybe(implementation="eager"))
        if "rope_theta" not in args:
            args.update(self.maybe(fused_qkv=True))
        args.update(self.maybe(upcast_softmax=False))
        return {**args, **self.maybe(causal=True), **self.maybe(bias=False)}

    def stream_norm(self):
        """A norm over a transformer's residual stream (f32 under autocast, so RMS norm learns a
        weight on PyTorch's fused path): layer norm or RMS norm."""
        if self.rng.random() < 0.5:
            return {"rms_norm": {**self.maybe(eps=1e-6), **self.maybe(elementwise_affine=False),
                                 **self.maybe(implementation="composite")}}
        return {"layer_norm": self.layer_norm_args()}

    def layer_norm_args(self):
        return {**self.maybe(eps=1e-6), **self.maybe(elementwise_affine=False), **self.maybe(bias=False)}

    def conv_args(self, channels, stride=None, same=False):
        rng = self.rng
        out = rng.randint(1, 12)
        divisors = [g for g in range(1, channels + 1) if channels % g == 0 and out % g == 0]
        k = rng.choice([1, 3, 5]) if same else rng.choice([1, 2, 3, 5])
        args = {"out_channels": out, "kernel_size": k}
        if same:
            args["padding"] = k // 2
        else:
            args.update(self.maybe(padding=rng.randint(0, k // 2)))
            args.update(self.maybe(dilation=2))
        s = stride or rng.choice([1, 1, 2])
        if s > 1:
            args["stride"] = s
        args.update(self.maybe(groups=rng.choice(divisors)))
        args.update(self.maybe(bias=False))
        return args

    def residual(self, shape):
        """A block whose body keeps the sample's side (odd kernels padded by half) or strides
        it, with a 1x1 convolution (and maybe batch norm) as the shortcut where the shape
        changes; or over features, a linear body."""
        rng = self.rng
        image = len(shape) == 3
        body = []
        if image:
            stride = rng.choice([1, 1, 2])
            first = self.conv_args(shape[0], stride=stride, same=True)
            body.append({"conv2d": first})
        else:
            if rng.random() < 0.3:
                body.append({"layer_norm": self.layer_norm_args()})
            body.append({"linear": {"out_features": rng.choice([shape[-1], rng.randint(1, 48)]), **self.maybe(bias=False)}})
        body, layers_out = self.rest_of_body(shape, body)
        block = {"layers": body}
        if layers_out != shape:
            if image:
                shortcut = [{"conv2d": {"out_channels": layers_out[0], "kernel_size": 1,
                                        **({"stride": first.get("stride")} if first.get("stride") else {}),
                                        **self.maybe(bias=False)}}]
            else:
                shortcut = [{"linear": {"out_features": layers_out[-1]}}]
            if rng.random() < 0.5 and len(layers_out) == 2:
                shortcut.append({"layer_norm": self.layer_norm_args()})
            elif rng.random() < 0.5:
                self.note_norm(layers_out)
                shortcut.append({"batch_norm2d" if image else "batch_norm1d": {}})
            block["shortcut"] = shortcut
        ((last_kind, last_args),) = body[-1].items()
        if not self.keeps(last_kind, last_args, True) and rng.random() < 0.5:
            block["inplace"] = True
        return {"residual": block}

    def rest_of_body(self, shape, body):
        """The body's first layer, then up to three more that keep the shape."""
        out = modules(body, shape)[1]
        kept = False
        for _ in range(self.rng.randint(0, 3)):
            choice = self.rng.choice(["norm", "activation", "conv"])
            if choice == "norm" and len(out) < 3 and self.rng.random() < 0.6:
                layer = {"layer_norm": self.layer_norm_args()}
            elif choice == "norm":
                self.note_norm(out)
                layer = {"batch_norm2d" if len(out) == 3 else "batch_norm1d": self.maybe(affine=False)}
            elif choice == "activation":
                name = self.rng.choice(self.ACTIVATIONS)
                layer = {name: {"inplace": True} if name in ("relu", "relu6", "leaky_relu") and not kept
                         and self.rng.random() < 0.5 else {}}
            elif len(out) == 3:
                layer = {"conv2d": {**self.conv_args(out[0], stride=1, same=True)}}
            else:
                layer = {"linear": {"out_features": out[-1]}}
            body.append(layer)
            ((kind, args),) = layer.items()
            kept = self.keeps(kind, args, kept)
            out = modules(body, shape)[1]
        return body, out


def one_thread():
    """A worker's PyTorch on one thread: the workers share the cores."""
    torch.set_num_threads(1)


def run_task(binary, cuda, task):
    """One comparison in a worker: its row, or headroom's refusal."""
    name, job, batch, torchvision_name, _ = task
    try:
        return compare(binary, name, job, batch, cuda, torchvision_name), None
    except Refused as error:
        return None, str(error)


def with_attention(job, implementation):
    """`job` with every self-attention layer of its list (or its config's model) computed by
    `implementation`."""
    if "huggingface" in job["model"]:
        config = {**job["model"]["huggingface"], "attn_implementation": implementation}
        return {**job, "model": {**job["model"], "huggingface": config}}
    def rewrite(layers):
        return [{kind: ({**args, "implementation": implementation} if kind == "self_attention"
                        else {**args, "layers": rewrite(args["layers"])} if kind in CONTAINERS
                        else args)}
                for ((kind, args),) in (layer.items() for layer in layers)]
    return {**job, "model": {**job["model"], "layers": rewrite(job["model"]["layers"])}}


def sequence_variants(name, job, lengths):
    """`(name, job)` at each of `lengths` (a comma-separated list) its position table holds, for a
    job over token ids; else the job itself."""
    tokens = job["model"].get("tokens")
    if not lengths or not tokens:
        return [(name, job)]
    tables = [args["max_positions"] for layer in job["model"].get("layers", [])
              for kind, args in layer.items() if kind == "positional_embedding"]
    return [(f"{name}@{t}", {**job, "model": {**job["model"], "tokens": {**tokens, "sequence_length": t}}})
            for t in map(int, lengths.split(",")) if all(t <= most for most in tables)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headroom", required=True, help="the headroom binary")
    parser.add_argument("examples", nargs="*", type=pathlib.Path, help="job files")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCHES)))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--random", type=int, default=0, help="also check this many generated layer lists")
    parser.add_argument("--seed", type=int, help="the generator's seed (default: from the clock)")
    parser.add_argument("--cuda", action="store_true", help="measure on the GPU")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows here")
    parser.add_argument("--attention", choices=["sdpa", "eager"],
                        help="run every example's self-attention this way (its implementation)")
    parser.add_argument("--sequence-lengths",
                        help="check the examples over token ids at these sequence lengths (those "
                             "their position table holds), not their own")
    args = parser.parse_args()
    if args.cuda and not torch.cuda.is_available():
        print("--cuda: PyTorch sees no GPU", file=sys.stderr)
        return 2
    rows, refused = [], []

    def record(row):
        rows.append(row)
        print(
            f"{row['example']:<24} {row['precision']:<10} {row['optimizer']:<12} {row['batch']:>6} "
            f"pytorch {row['pytorch']:>14,} headroom {row['headroom']:>14,} "
            f"diff {row['difference']:>+8,} peak in {row['peak_at']:<15}"
            + (f" FAILED: {', '.join(row['failed'])} {row['categories']}" if row["failed"] else ""),
            flush=True,
        )

    # (name, job, batch, torchvision model, generated): every comparison, drawn up front so
    # that the generator's sequence does not depend on how they are run.
    tasks = []
    for path in args.examples:
        job = json.loads(path.read_text())
        if args.attention:
            job = with_attention(job, args.attention)
        torchvision_name = TORCHVISION.get(path.stem)
        batches = TORCHVISION_BATCHES if torchvision_name else list(map(int, args.batch_sizes.split(",")))
        for name, variant in sequence_variants(path.stem, job, args.sequence_lengths):
            for batch in batches:
                for precision in args.precisions.split(","):
                    tasks.append((name, dict(variant, precision=precision), batch, torchvision_name, False))
    if args.random:
        seed = args.seed if args.seed is not None else int(time.time())
        print(f"generated layer lists: --random {args.random} --seed {seed}", flush=True)
        generator = Generator(seed)
        for i in range(args.random):
            job = generator.job()
            sharded = f" fsdp/{job['world_size']}" if job.get("sharding") else ""
            sharded += " kept" if job.get("reshard_after_forward") is False else ""
            tasks.append((f"random #{i}{sharded}", job, generator.batch(), None, True))
    # Each comparison is independent: they run in worker processes, one per core (MemTracker's
    # bookkeeping is single-threaded Python), and are reported in order.
    workers = 1 if args.cuda else max(1, os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=one_thread) as pool:
        runs = [pool.submit(run_task, args.headroom, args.cuda, task) for task in tasks]
        for (name, job, _, _, generated), run in zip(tasks, runs):
            row, error = run.result()
            if error is not None:
                if not generated:
                    raise SystemExit(f"{name} REFUSED: {error}")
                refused.append(job)
                print(f"{name} REFUSED: {error}\n{json.dumps(job)}", flush=True)
                continue
            record(row)
            if row["failed"] and generated:
                print(json.dumps(job), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    worst = max((abs(r["difference"]) for r in rows), default=0)
    worst_ratio = max((abs(r["ratio"] - 1) for r in rows), default=0)
    print(f"{len(rows)} comparisons, largest difference {worst:,} bytes ({worst_ratio:.2e} relative); "
          f"{len(refused)} generated lists refused")
    failed = [r for r in rows if r["failed"]]
    if failed:
        print(f"{len(failed)} outside {RELATIVE:.1%} or {SLACK_BYTES} bytes", file=sys.stderr)
    return 1 if failed or refused else 0


if __name__ == "__main__":
    sys.exit(main())
