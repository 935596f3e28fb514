#!/usr/bin/env python3
"""PyTorch CPU's fused attention, forward and backward, on the shapes of
`crates/devices/benches/attention.rs` (4 sequences, GPT-2 small's 12 heads of 64, causal, f32):
the median of 10 timed steps after 2 warm-ups, per sequence length. Usage:
`python3 scripts/sdpa-cpu-bench.py [threads]` (the machine's cores by default)."""

import statistics
import sys
import time

import torch
import torch.nn.functional as F


def main():
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    for sequence in (256, 1024):
        q, k, v = ((torch.rand(4, 12, sequence, 64) * 2 - 1).requires_grad_() for _ in range(3))
        dout = torch.rand(4, 12, sequence, 64) * 2 - 1
        times = []
        for step in range(12):
            start = time.perf_counter()
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(dout)
            elapsed = time.perf_counter() - start
            if step >= 2:
                times.append(elapsed)
            for t in (q, k, v):
                t.grad = None
        print(f"sequence {sequence}: {statistics.median(times) * 1e3:.2f} ms forward+backward "
              f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
