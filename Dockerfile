# switchyard image: `docker build -t switchyard .` from the repository root.
# Multi-stage: the build stage has Rust, cmake (Pingora's zlib-ng) and protoc (etcd's API); the
# runtime stage is Debian slim with two binaries, a non-root user and a HEALTHCHECK on /healthz.
# .ci/run builds the binaries with this file's cargo command, so the image's build is tested.

FROM rust:1-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# BUILD: the command .ci/run runs too (keep it on one line).
RUN cargo build --release --locked --bin switchyard --bin proxyctl

FROM debian:bookworm-slim
# ca-certificates: none of switchyard's own connections need them today (etcd and upstreams are
# plain HTTP); the image stays minimal.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/switchyard \
        --shell /usr/sbin/nologin switchyard \
    && mkdir -p /etc/switchyard /run/switchyard /var/lib/switchyard \
    && chown switchyard:switchyard /run/switchyard /var/lib/switchyard \
    && chmod 0750 /run/switchyard /var/lib/switchyard
COPY --from=build /src/target/release/switchyard /src/target/release/proxyctl /usr/local/bin/
# The control socket and state live on volumes (examples/compose/docker-compose.yml), so
# `docker compose exec switchyard proxyctl switch green` reaches the running proxy.
ENV SWITCHYARD_SOCKET=/run/switchyard/control.sock
VOLUME ["/run/switchyard", "/var/lib/switchyard"]
USER 10001:10001
EXPOSE 8080
# GET /healthz on the config's admin listener (127.0.0.1:9091 by default), no curl needed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["switchyard", "healthcheck", "-c", "/etc/switchyard/switchyard.yaml"]
# SIGTERM drains in-flight requests (grace_period) before exiting: give `docker stop` longer.
STOPSIGNAL SIGTERM
ENTRYPOINT ["switchyard"]
CMD ["run", "-c", "/etc/switchyard/switchyard.yaml"]
