"""The training step headroom probes, written in JAX (XLA, jit) or PyTorch (CPU), for the peer
benchmark: an MLP with softmax cross-entropy and Adam/AdamW as headroom's `step.rs` does them, f32,
synthetic data made before the clock starts. Prints samples/s of `steps` timed steps as JSON."""

import argparse
import json
import time

BETA1, BETA2, EPS, DECAY = 0.9, 0.999, 1e-8, 0.01


def widths(args):
    return [args.inputs] + args.hidden + [args.classes]


def run_jax(args):
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    sizes = widths(args)
    params = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        key, sub = jax.random.split(key)
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        params.append((jax.random.uniform(sub, (fan_in, fan_out), jnp.float32, -bound, bound),
                       jnp.zeros((fan_out,), jnp.float32)))
    key, kx, ky = jax.random.split(key, 3)
    x = jax.random.normal(kx, (args.batch, args.inputs), jnp.float32)
    y = jax.random.randint(ky, (args.batch,), 0, args.classes)
    act = jax.nn.relu if args.activation == "relu" else (
        (lambda v: jax.nn.gelu(v, approximate=True)) if args.activation == "gelu" else jnp.tanh)

    def loss(params, x, y):
        h = x
        for w, b in params[:-1]:
            h = act(h @ w + b)
        w, b = params[-1]
        logits = h @ w + b
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    decay = DECAY if args.optimizer == "adamw" else 0.0

    @jax.jit
    def step(params, m, v, t, x, y):
        grads = jax.grad(loss)(params, x, y)
        m = jax.tree_util.tree_map(lambda m, g: BETA1 * m + (1 - BETA1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v, g: BETA2 * v + (1 - BETA2) * g * g, v, grads)
        c1, c2 = 1 / (1 - BETA1 ** t), 1 / (1 - BETA2 ** t)
        params = jax.tree_util.tree_map(
            lambda p, m, v: p - args.lr * (decay * p + m * c1 / (jnp.sqrt(v * c2) + EPS)),
            params, m, v)
        return params, m, v

    state = (params, zeros, zeros)
    for t in range(1, 3):  # compile and warm up
        state = step(*state, float(t), x, y)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for t in range(3, 3 + args.steps):
        state = step(*state, float(t), x, y)
    jax.block_until_ready(state)
    return time.perf_counter() - start


def run_torch(args):
    import torch

    torch.manual_seed(0)
    sizes = widths(args)
    layers = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        layers.append(torch.nn.Linear(fan_in, fan_out))
        layers.append({"relu": torch.nn.ReLU(), "gelu": torch.nn.GELU(approximate="tanh"),
                       "tanh": torch.nn.Tanh()}[args.activation])
    model = torch.nn.Sequential(*layers[:-1])
    opt = (torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=DECAY)
           if args.optimizer == "adamw" else torch.optim.Adam(model.parameters(), lr=args.lr))
    x = torch.randn(args.batch, args.inputs)
    y = torch.randint(0, args.classes, (args.batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("peer", choices=["jax", "torch"])
    parser.add_argument("--inputs", type=int, required=True)
    parser.add_argument("--hidden", type=int, nargs="*", default=[])
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--optimizer", choices=["adam", "adamw"], default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    seconds = (run_jax if args.peer == "jax" else run_torch)(args)
    print(json.dumps({"samples_per_second": args.batch * args.steps / seconds}))


if __name__ == "__main__":
    main()
