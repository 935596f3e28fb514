"""The image examples on headroom's host device against PyTorch CPU: LeNet-5
(examples/lenet5-mnist.json) and the batch-norm CNN (examples/cifar10-cnn-bn.json), the same
layers, SGD with momentum, f32, synthetic data made before the clock starts, run alternately at
each batch size. Prints samples/s and the ratio headroom / PyTorch (medians of the rounds).

    python benches/peers/images.py --headroom target/release/headroom [--rounds 3]

Needs `torch` in the Python that runs it (run.sh with PEERS_TORCH=1 installs it)."""

import argparse
import json
import pathlib
import statistics
import time

from compare import probe

STEPS = 10
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


#: Each example: its name in the table, its PyTorch model, its input and the batch sizes timed.
MODELS = {
    "lenet5-mnist.json": ("LeNet-5", lenet5, (1, 28, 28), [64, 256, 1024]),
    "cifar10-cnn-bn.json": ("CIFAR CNN with batch norm", batch_norm_cnn, (3, 32, 32), [16, 64, 256]),
}


def headroom(binary, example, batch):
    """Samples/s of STEPS timed steps (a probe times all but its first step)."""
    job = json.loads((EXAMPLES / example).read_text())
    job["search"] = {"steps_per_probe": STEPS + 1, "min_timed_seconds": 0}
    return probe(binary, job, batch)["samples_per_second"]


def pytorch(example, batch):
    import torch
    from torch import nn

    torch.manual_seed(0)
    _, build, shape, _ = MODELS[example]
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
    for _ in range(STEPS):
        step()
    return batch * STEPS / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headroom", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| model | batch | headroom host (samples/s) | PyTorch CPU | headroom / PyTorch |")
    print("|---|---|---|---|---|")
    for example, (name, _, _, batches) in MODELS.items():
        for batch in batches:
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(headroom(args.headroom, example, batch))
                theirs.append(pytorch(example, batch))
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"| {name} | {batch} | {a / 1e3:.2f}k | {b / 1e3:.2f}k | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
