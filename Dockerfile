# syntax=docker/dockerfile:1
# aoai-lb container image.
#
#   docker build -t aoai-lb .
#   docker run -p 8000:8000 -e OPENAI_INSTANCES='{"instances":[...]}' -e API_KEY=... aoai-lb
#
# Port 8000 is the public gateway (the seed app's port). Port 8001 serves
# /metrics and /admin/backends: publish it only to your monitoring network,
# never on the public ingress.

# Expected size: about 30 MB (distroless/cc-debian12, about 23 MB, plus the
# stripped binary). Deploying it: README.md, "Deploy to Azure" (deploy/).

# ---- build ---------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

COPY Cargo.toml Cargo.lock ./
COPY crates crates
# Cache mounts keep the registry and compiled dependencies between builds
# (BuildKit), so a source change does not rebuild every dependency. The
# binary is copied out because the target cache is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p aoai-lb \
    && cp target/release/aoai-lb /aoai-lb

# ---- runtime -------------------------------------------------------------
# distroless/cc: glibc and libgcc only, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /aoai-lb /usr/local/bin/aoai-lb
USER nonroot:nonroot
ENV HOST=0.0.0.0 \
    PORT=8000 \
    ADMIN_PORT=8001
EXPOSE 8000
# Container Apps sends SIGTERM; the gateway then turns /readyz to 503,
# stops accepting and lets in-flight streams finish (server.shutdown_grace_ms).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/aoai-lb"]
