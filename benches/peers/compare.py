"""Runs headroom's host step and its peers alternately and prints the table (see run.sh)."""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

MODELS = {
    "3072-128-10 Adam": dict(inputs=3072, hidden=[128], classes=10, activation="relu",
                             optimizer="adam"),
    "3072-1024x3-10 AdamW GELU": dict(inputs=3072, hidden=[1024, 1024, 1024], classes=10,
                                       activation="gelu", optimizer="adamw"),
}
BATCHES = [256, 1024, 4096]
STEPS = 20


def headroom(binary, model, batch, steps):
    """Samples/s of `steps` timed steps (a probe times all but its first step)."""
    job = {"model": {"input_shape": [model["inputs"]], "hidden_layers": model["hidden"],
                     "num_classes": model["classes"], "activation": model["activation"]},
           "optimizer": {"name": model["optimizer"], "learning_rate": 0.001},
           "search": {"steps_per_probe": steps + 1}}
    return probe(binary, job, batch)


def probe(binary, job, batch):
    """What `headroom probe` measured of `job` at `batch` on the host device (8 GiB)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(job, f)
        f.flush()
        out = subprocess.run([binary, "probe", f.name, "--device", "host", "--host-memory", "8GiB",
                              "--batch-size", str(batch), "--json"],
                             check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]


def peer(name, model, batch):
    args = [sys.executable, "benches/peers/step.py", name, "--inputs", str(model["inputs"]),
            "--classes", str(model["classes"]), "--activation", model["activation"],
            "--optimizer", model["optimizer"], "--batch", str(batch), "--steps", str(STEPS),
            "--hidden", *map(str, model["hidden"])]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["samples_per_second"]


def gemm_ceiling(n=4096):
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    a @ b
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--headroom", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch", action="store_true")
    args = parser.parse_args()
    peers = ["jax"] + (["torch"] if args.torch else [])
    runs = {}
    growth = {2: [], 21: []}
    deep = MODELS["3072-1024x3-10 AdamW GELU"]
    for round_ in range(args.rounds):
        for name, model in MODELS.items():
            for batch in BATCHES:
                key = (name, batch)
                runs.setdefault(key, {"headroom": [], **{p: [] for p in peers}})
                runs[key]["headroom"].append(
                    headroom(args.headroom, model, batch, STEPS)["samples_per_second"])
                for p in peers:
                    runs[key][p].append(peer(p, model, batch))
        for steps in growth:
            growth[steps].append(headroom(args.headroom, deep, 1024, steps)["step_seconds"])
        print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)

    header = "| model, batch | headroom host | " + " | ".join(
        {"jax": "JAX (XLA, jit)", "torch": "PyTorch CPU"}[p] for p in peers) + " | " + " | ".join(
        f"headroom / {p}" for p in peers) + " |"
    print(header)
    print("|" + "---|" * (2 + 2 * len(peers)))
    for (name, batch), samples in runs.items():
        median = {k: statistics.median(v) for k, v in samples.items()}
        cells = [f"{median['headroom'] / 1000:.2f}k"] + [f"{median[p] / 1000:.2f}k" for p in peers]
        ratios = [f"{median['headroom'] / median[p]:.2f}" for p in peers]
        print(f"| {name}, {batch} | " + " | ".join(cells + ratios) + " |")
    print(f"\nmedians of {args.rounds} alternating rounds, {STEPS} timed steps each; f32 GEMM "
          f"ceiling (numpy {np.__version__}, 4096^3): {gemm_ceiling():.0f} GFLOP/s")
    print("headroom deep model, batch 1024, mean step: "
          f"{statistics.median(growth[2]):.3f} s over 2 steps, "
          f"{statistics.median(growth[21]):.3f} s over 21 "
          f"(per round: {[round(s, 3) for s in growth[2]]} vs {[round(s, 3) for s in growth[21]]})")


if __name__ == "__main__":
    main()
