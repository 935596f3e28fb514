"""headroom's PyTorch profile against PyTorch's own accounting of the same training step.

For every example job, every precision and several batch sizes, this builds the job's model in
PyTorch, runs one steady-state training step (a warm-up step first, so the optimizer's state
exists, as it does in every step of a real run) and reads its peak memory by category, then asks
`headroom estimate JOB --batch-size N --json` for the PyTorch profile's peak, and compares:
the totals within 3%, and the categories where the two name the same thing.

Without a GPU (the default) PyTorch runs under FakeTensorMode, and
`torch.distributed._tools.mem_tracker.MemTracker` follows every tensor the step creates and
frees. The optimizers are PyTorch's `foreach` implementations, which PyTorch picks on a GPU (on
the CPU it would pick the single-tensor ones). With `--cuda`, on a real GPU, the step runs for
real and `torch.cuda.max_memory_allocated` and `max_memory_reserved` are compared with the
profile's peak under the caching allocator's rounding (for the first GPU run).

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

Exits 1 if any comparison is outside the band, 2 on a usage error; prints a table either way.
"""

import argparse
import json
import math
import pathlib
import subprocess
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

BAND = (0.97, 1.03)
PRECISIONS = ["32-true", "bf16-mixed", "16-mixed", "bf16-true"]
DEFAULT_BATCHES = [1, 16, 256, 4096, 65536]


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


ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": lambda: nn.GELU(approximate="tanh"),
    "tanh": nn.Tanh,
}


def layer_list(model_spec):
    """The job's model as a layer list: `model.layers`, or the shorthand's MLP written as one."""
    if "layers" in model_spec:
        return model_spec["layers"]
    layers = [{"flatten": {}}]
    for hidden in model_spec.get("hidden_layers", []):
        layers += [{"linear": {"out_features": hidden}}, {model_spec.get("activation", "relu"): {}}]
    return layers + [{"linear": {"out_features": model_spec["num_classes"]}}]


class Residual(nn.Module):
    """A layer list's `residual` block: `body(x) + shortcut(x)`, neither in place."""

    def __init__(self, body, shortcut):
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


def modules(specs, shape, device, dtype):
    """The modules of a layer list over samples of `shape`, and the shape they pass on."""
    layers = []
    for layer in specs:
        ((kind, args),) = layer.items()
        if kind == "conv2d":
            k, stride, padding = args["kernel_size"], args.get("stride", 1), args.get("padding", 0)
            bias = args.get("bias", True)
            layers.append(
                nn.Conv2d(shape[0], args["out_channels"], k, stride, padding, bias=bias, device=device, dtype=dtype)
            )
            side = lambda n: (n + 2 * padding - k) // stride + 1
            shape = [args["out_channels"], side(shape[1]), side(shape[2])]
        elif kind in ("max_pool2d", "avg_pool2d"):
            k, padding = args["kernel_size"], args.get("padding", 0)
            stride = args.get("stride") or k
            pool = nn.MaxPool2d if kind == "max_pool2d" else nn.AvgPool2d
            layers.append(pool(k, stride, padding))
            side = lambda n: (n + 2 * padding - k) // stride + 1
            shape = [shape[0], side(shape[1]), side(shape[2])]
        elif kind == "batch_norm2d":
            layers.append(nn.BatchNorm2d(shape[0], affine=args.get("affine", True), device=device, dtype=dtype))
        elif kind == "global_avg_pool2d":
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            shape = [shape[0]]
        elif kind == "residual":
            body, out = modules(args["layers"], shape, device, dtype)
            if out == shape:
                shortcut = nn.Identity()
            else:
                stride = next(s for s in range(1, shape[1] + 1) if (shape[1] - 1) // s + 1 == out[1])
                shortcut = nn.Sequential(
                    nn.Conv2d(shape[0], out[0], 1, stride, bias=False, device=device, dtype=dtype),
                    nn.BatchNorm2d(out[0], device=device, dtype=dtype),
                )
            layers.append(Residual(nn.Sequential(*body), shortcut))
            shape = out
        elif kind == "flatten":
            if len(shape) > 1:  # already flat after global_avg_pool2d
                layers.append(nn.Flatten())
                shape = [math.prod(shape)]
        elif kind == "linear":
            out = args["out_features"]
            layers.append(nn.Linear(math.prod(shape), out, device=device, dtype=dtype))
            shape = [out]
        elif kind == "dropout":
            p = args.get("p", 0.5)
            layers.append(nn.Dropout(p) if device == "cuda" else GpuDropout(p))
        elif kind in ACTIVATIONS:
            layers.append(ACTIVATIONS[kind]())
        else:
            raise SystemExit(f"the memory check does not build {kind} layers yet")
    return layers, shape


def build(job, device):
    """The job's network and its optimizer (foreach), on `device`, in the job's precision."""
    model_spec = job["model"]
    dtype = torch.bfloat16 if job.get("precision") == "bf16-true" else torch.float32
    layers, _ = modules(layer_list(model_spec), list(model_spec["input_shape"]), device, dtype)
    if isinstance(layers[0], nn.Linear):
        layers.insert(0, nn.Flatten())
    model = nn.Sequential(*layers)
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


def train_step(job, model, optimizer, batch, device):
    """One training step as the module docstring writes it."""
    precision = job.get("precision", "32-true")
    shape = job["model"]["input_shape"]
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, job["model"]["num_classes"], (batch,), device=device)
    if precision == "bf16-true":
        x = x.to(torch.bfloat16)
    if precision in ("bf16-mixed", "16-mixed"):
        half = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        with torch.autocast(device_type=torch.device(device).type, dtype=half):
            loss = F.cross_entropy(model(x), y)
    else:
        loss = F.cross_entropy(model(x), y)
    if precision == "16-mixed":
        scale = torch.full((), 65536.0, device=device)
        (loss * scale).backward()
        found_inf = torch.zeros((), device=device)
        grads = [p.grad for p in model.parameters()]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, scale.reciprocal())
    else:
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def pytorch_peak_fake(job, batch):
    """The step's peak under FakeTensorMode, by MemTracker's categories, in bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        model, optimizer = build(job, "cpu")
        train_step(job, model, optimizer, batch, "cpu")
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            train_step(job, model, optimizer, batch, "cpu")
        peak = tracker.get_tracker_snapshot("peak")
    (categories,) = peak.values()
    named = {str(k).rsplit(".", 1)[-1].lower(): v for k, v in categories.items()}
    return {"total": named["total"], **{k: v for k, v in named.items() if k != "total"}}


def pytorch_peak_cuda(job, batch):
    """The step's peak on the GPU: the caching allocator's allocated and reserved bytes, less
    what was allocated before the model (cuBLAS's workspace, made by a first product)."""
    torch.cuda.empty_cache()
    warm = torch.ones(8, 8, device="cuda")
    (warm @ warm).sum().item()
    del warm
    baseline = torch.cuda.memory_allocated()
    model, optimizer = build(job, "cuda")
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


def headroom_peak(binary, job, batch):
    """headroom's PyTorch profile at `batch`: the estimate's JSON."""
    job = dict(job, framework="pytorch")
    output = subprocess.run(
        [binary, "estimate", "-", "--batch-size", str(batch), "--json"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
    )
    if output.returncode != 0:
        raise SystemExit(f"headroom estimate failed: {output.stderr}")
    return json.loads(output.stdout)


def within(ours, theirs, slack=64):
    """Whether `ours` is within the band of `theirs` (or within `slack` bytes of it)."""
    if abs(ours - theirs) <= slack:
        return True
    return theirs > 0 and BAND[0] <= ours / theirs <= BAND[1]


def compare(binary, name, job, batch, cuda):
    """One row: the totals and the categories that mean the same on both sides."""
    theirs = pytorch_peak_cuda(job, batch) if cuda else pytorch_peak_fake(job, batch)
    estimate = headroom_peak(binary, job, batch)
    memory = estimate["memory"]
    ours_total = estimate["pytorch_cuda_bytes"] if cuda else memory["total"]
    checks = {"total": (ours_total, theirs["total"])}
    if not cuda:
        # MemTracker calls a gradient a temporary until autograd has accumulated it, and the
        # peak often falls between the two: gradients, activations, the batch and temporaries
        # are compared together. Mixed precision counts autocast's weight copies with the
        # parameters here and with what forward made in MemTracker.
        # headroom counts batch norm's running statistics with the parameters, MemTracker as
        # buffers.
        params = theirs.get("param", 0) + theirs.get("buffer", 0)
        optimizer = theirs.get("opt", 0)
        checks["optimizer state"] = (memory["optimizer_state"], optimizer)
        if job.get("precision") in ("32-true", "bf16-true"):
            checks["parameters"] = (memory["parameters"], params)
            checks["gradients, activations, batch"] = (
                memory["total"] - memory["parameters"] - memory["optimizer_state"],
                theirs["total"] - params - optimizer,
            )
    failed = [k for k, (ours, their) in checks.items() if not within(ours, their)]
    ratio = ours_total / theirs["total"] if theirs["total"] else float("nan")
    return {
        "example": name,
        "precision": job.get("precision", "32-true"),
        "batch": batch,
        "pytorch": theirs["total"],
        "reserved": theirs.get("reserved"),
        "headroom": ours_total,
        "ratio": ratio,
        "peak_at": memory.get("peak_at"),
        "failed": failed,
        "categories": {k: v for k, v in checks.items()},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headroom", required=True, help="the headroom binary")
    parser.add_argument("examples", nargs="+", type=pathlib.Path, help="job files")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCHES)))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--cuda", action="store_true", help="measure on the GPU")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows here")
    args = parser.parse_args()
    if args.cuda and not torch.cuda.is_available():
        print("--cuda: PyTorch sees no GPU", file=sys.stderr)
        return 2
    rows = []
    for path in args.examples:
        job = json.loads(path.read_text())
        for precision in args.precisions.split(","):
            for batch in map(int, args.batch_sizes.split(",")):
                rows.append(
                    compare(args.headroom, path.stem, dict(job, precision=precision), batch, args.cuda)
                )
                row = rows[-1]
                print(
                    f"{row['example']:<22} {row['precision']:<10} {row['batch']:>7} "
                    f"pytorch {row['pytorch']:>14,} headroom {row['headroom']:>14,} "
                    f"ratio {row['ratio']:.4f} peak in {row['peak_at']:<15}"
                    + (f" FAILED: {', '.join(row['failed'])} {row['categories']}" if row["failed"] else ""),
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    ratios = [r["ratio"] for r in rows]
    print(f"{len(rows)} comparisons, ratios {min(ratios):.4f} to {max(ratios):.4f}")
    failed = [r for r in rows if r["failed"]]
    if failed:
        print(f"{len(failed)} outside {BAND[0]}-{BAND[1]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
