"""The image examples on headroom's host device against PyTorch CPU: LeNet-5
(examples/lenet5-mnist.json), the batch-norm CNN (examples/cifar10-cnn-bn.json) and the CIFAR
ResNet-18 (examples/resnet18-cifar10.json), the same layers, SGD with momentum, f32, synthetic
data made before the clock starts, run alternately at each batch size. Prints samples/s and the
ratio headroom / PyTorch (medians of the rounds).

    python benches/peers/images.py --headroom target/release/headroom [--rounds 3]

Needs `torch` in the Python that runs it (run.sh with PEERS_TORCH=1 installs it)."""

import argparse
import json
import pathlib
import statistics
import time

from compare import probe

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def lenet5(nn):
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def batch_norm_cnn(nn):
    def stage(inputs, outputs):
        return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(
        *stage(3, 32), nn.MaxPool2d(2), *stage(32, 64), nn.MaxPool2d(2), *stage(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def resnet18(nn):
    class Residual(nn.Module):
        def __init__(self, inputs, outputs, stride):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(),
                nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False), nn.BatchNorm2d(outputs))
            self.shortcut = nn.Identity() if (inputs, stride) == (outputs, 1) else nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

        def forward(self, x):
            return self.body(x) + self.shortcut(x)

    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    inputs = 64
    for outputs, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [Residual(inputs, outputs, stride), nn.ReLU(), Residual(outputs, outputs, 1), nn.ReLU()]
        inputs = outputs
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


#: Each example: its name in the table, its PyTorch model, its input, the batch sizes timed and
#: the steps timed at each.
MODELS = {
    "lenet5-mnist.json": ("LeNet-5", lenet5, (1, 28, 28), [64, 256, 1024], 10),
    "cifar10-cnn-bn.json": ("CIFAR CNN with batch norm", batch_norm_cnn, (3, 32, 32), [16, 64, 256], 10),
    "resnet18-cifar10.json": ("CIFAR ResNet-18", resnet18, (3, 32, 32), [8, 32], 3),
}


def headroom(binary, example, batch):
    """Samples/s of the example's timed steps (a probe times all but its first step)."""
    job = json.loads((EXAMPLES / example).read_text())
    job["search"] = {"steps_per_probe": MODELS[example][4] + 1, "min_timed_seconds": 0}
    return probe(binary, job, batch)["samples_per_second"]


def pytorch(example, batch):
    import torch
    from torch import nn

    torch.manual_seed(0)
    _, build, shape, _, steps = MODELS[example]
    model = build(nn)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    x = torch.rand(batch, *shape)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def rate(samples_per_second):
    """`5.44k` from 1000 samples/s up, `12.3` below."""
    if samples_per_second >= 1000:
        return f"{samples_per_second / 1e3:.2f}k"
    return f"{samples_per_second:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headroom", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| model | batch | headroom host (samples/s) | PyTorch CPU | headroom / PyTorch |")
    print("|---|---|---|---|---|")
    for example, (name, _, _, batches, _) in MODELS.items():
        for batch in batches:
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(headroom(args.headroom, example, batch))
                theirs.append(pytorch(example, batch))
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"| {name} | {batch} | {rate(a)} | {rate(b)} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
