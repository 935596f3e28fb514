# headroom: multi-stage build. The Rust builder compiles the binary (cudarc loads CUDA at run
# time, so no CUDA is needed to build); the NVIDIA CUDA runtime image brings libnvrtc, and the
# node's driver brings libcuda and NVML through the NVIDIA container toolkit.
FROM rust:1.85-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY kernels kernels
COPY benches benches
COPY examples examples
COPY config config
RUN cargo build --release --locked --bin headroom

FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home headroom
COPY --from=build /src/target/release/headroom /usr/local/bin/headroom
COPY config/default.toml /etc/headroom/config.toml
COPY examples /usr/share/headroom/examples
USER headroom
# Settings come from /etc/headroom/config.toml (mount your own) and HEADROOM_* variables.
ENV HEADROOM_BIND=0.0.0.0:8080 \
    HEADROOM_LOG_FORMAT=json \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s \
  CMD curl -fsS http://127.0.0.1:8080/livez || exit 1
ENTRYPOINT ["headroom", "serve", "--config", "/etc/headroom/config.toml"]
