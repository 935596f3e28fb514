#!/usr/bin/env bash
# The peer benchmark: the same MLP training step in headroom's host device, JAX (XLA, jit) and,
# with PEERS_TORCH=1, PyTorch CPU (and then the image examples against PyTorch CPU: images.py), run
# alternately on the same shapes and batch sizes. Prints
# samples/s, the ratio headroom / peer, and the machine's f32 GEMM ceiling. Not part of
# `cargo test`: it installs the peers from PyPI into .deps/peers (PyTorch's wheel is large).
#
#   bash benches/peers/run.sh                 # 3 rounds; PEERS_ROUNDS=6 for steadier medians
#   HEADROOM_BIN=/path/to/old/headroom bash benches/peers/run.sh   # another build, e.g. before a change
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=.deps/peers
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
packages=(jax numpy)
[ "${PEERS_TORCH:-0}" = 1 ] && packages+=(torch)
"$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}"

bin=${HEADROOM_BIN:-target/release/headroom}
if [ -z "${HEADROOM_BIN:-}" ]; then
  cargo build --release --quiet
fi
"$venv/bin/python" benches/peers/compare.py --headroom "$bin" --rounds "${PEERS_ROUNDS:-3}" \
  $([ "${PEERS_TORCH:-0}" = 1 ] && echo --torch)
if [ "${PEERS_TORCH:-0}" = 1 ]; then
  "$venv/bin/python" benches/peers/images.py --headroom "$bin" --rounds "${PEERS_ROUNDS:-3}"
fi
