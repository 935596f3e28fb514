"""LeNet-5 (examples/lenet5-mnist.json) on headroom's host device against PyTorch CPU: the same
layers, SGD with momentum, f32, synthetic data made before the clock starts, run alternately at
each batch size. Prints samples/s and the ratio headroom / PyTorch (medians of the rounds).

    python benches/peers/lenet.py --headroom target/release/headroom [--rounds 3]

Needs `torch` in the Python that runs it (run.sh with PEERS_TORCH=1 installs it)."""

import argparse
import json
import pathlib
import statistics
import time

from compare import probe

BATCHES = [64, 256, 1024]
STEPS = 10
EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "lenet5-mnist.json"


def headroom(binary, batch):
    """Samples/s of STEPS timed steps (a probe times all but its first step)."""
    job = json.loads(EXAMPLE.read_text())
    job["search"] = {"steps_per_probe": STEPS + 1, "min_timed_seconds": 0}
    return probe(binary, job, batch)["samples_per_second"]


def torch_lenet(batch):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    x = torch.rand(batch, 1, 28, 28)
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
    print("| LeNet-5, batch | headroom host (samples/s) | PyTorch CPU | headroom / PyTorch |")
    print("|---|---|---|---|")
    for batch in BATCHES:
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(headroom(args.headroom, batch))
            theirs.append(torch_lenet(batch))
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"| {batch} | {a / 1e3:.2f}k | {b / 1e3:.2f}k | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
