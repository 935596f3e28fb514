# headroom: a multi-stage build. The Rust builder compiles the binary (cudarc loads CUDA at run
# time, so no CUDA is needed to build); the runtime is NVIDIA's CUDA base image with NVRTC alone
# (headroom loads no other CUDA library: no cuBLAS, cuFFT, NPP or NCCL), and the node's driver
# brings libcuda and NVML through the NVIDIA container toolkit.
#
#   docker build --build-arg HEADROOM_REVISION=$(git rev-parse --short=12 HEAD) -t headroom:0.1.0 .
#
# The builder's Rust must be at least Cargo.toml's rust-version, which is at least every locked
# dependency's; tests/deploy.rs checks the three agree.
FROM rust:1.89-bookworm AS build
WORKDIR /src
# Dependencies first, in a layer of their own: it is rebuilt only when a manifest or the
# lockfile changes. Each crate of the workspace gets an empty stand-in for its sources.
COPY Cargo.toml Cargo.lock ./
COPY crates/engine/Cargo.toml crates/engine/
COPY crates/devices/Cargo.toml crates/devices/
COPY crates/service/Cargo.toml crates/service/build.rs crates/service/
RUN for crate in engine devices service; do mkdir -p crates/$crate/src && touch crates/$crate/src/lib.rs; done \
 && mkdir -p src crates/devices/benches && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > crates/devices/benches/host.rs && cp crates/devices/benches/host.rs crates/devices/benches/tune.rs \
 && cargo build --release --locked --bin headroom \
 && rm -rf src crates/*/src crates/devices/benches
COPY src src
COPY crates crates
COPY examples examples
COPY config config
ARG HEADROOM_REVISION=unknown
ENV HEADROOM_REVISION=${HEADROOM_REVISION}
# The sources are newer than the placeholder build, so cargo rebuilds headroom's crates. The
# image's binary keeps its symbols (for backtraces) but no debug information: about 16 MB
# (16,254,000 bytes for x86-64, built here with these settings at d258e4f; 39 MB with line
# tables).
RUN touch src/main.rs crates/*/src/lib.rs \
 && CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    cargo build --release --locked --bin headroom

FROM nvidia/cuda:13.0.0-base-ubuntu24.04
ARG HEADROOM_REVISION=unknown
LABEL org.opencontainers.image.title="headroom" \
      org.opencontainers.image.description="Finds the largest training batch size a GPU can hold for a model, and answers with a safe one" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${HEADROOM_REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/headroom"
# NVRTC compiles the kernels for the GPU; the binary links the system's SQLite and OpenSSL
# (Ubuntu 24.04 names its OpenSSL 3 libssl3t64).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cuda-nvrtc-13-0 curl libsqlite3-0 libssl3t64 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 headroom \
 && useradd --system --uid 10001 --gid 10001 --no-create-home headroom \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/headroom
COPY --from=build /src/target/release/headroom /usr/local/bin/headroom
COPY config/default.toml /etc/headroom/config.toml
COPY examples /usr/share/headroom/examples
# Numeric, so that the kubelet can verify runAsNonRoot.
USER 10001:10001
# Settings come from /etc/headroom/config.toml (mount your own) and HEADROOM_* variables.
# CUDA_DEVICE_ORDER=PCI_BUS_ID numbers GPUs as nvidia-smi, Slurm and Kubernetes do. Jobs and
# results are kept in /var/lib/headroom (mount a volume there), or in PostgreSQL when
# HEADROOM_STORE says so.
ENV HEADROOM_BIND=0.0.0.0:8080 \
    HEADROOM_LOG_FORMAT=json \
    HEADROOM_STORE=sqlite:///var/lib/headroom/headroom.db \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    NVIDIA_VISIBLE_DEVICES=all \
    LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    HEADROOM_KERNEL_CACHE=/var/lib/headroom/kernels \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s \
  CMD curl -fsS http://127.0.0.1:8080/livez || exit 1
ENTRYPOINT ["headroom"]
CMD ["serve", "--config", "/etc/headroom/config.toml"]
