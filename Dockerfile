# aoai-lb container image.
#
#   docker build -t aoai-lb .
#   docker run -p 8000:8000 -e OPENAI_INSTANCES='{"instances":[...]}' -e API_KEY=... aoai-lb
#
# Port 8000 is the public gateway (the seed app's port). Port 8001 serves
# /metrics and /admin/backends: publish it only to your monitoring network,
# never on the public ingress.

# ---- build ---------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

# Dependencies first, so that a source change does not rebuild them: build
# the workspace once with stub sources, then with the real ones.
COPY Cargo.toml Cargo.lock ./
COPY crates/aoai-lb/Cargo.toml crates/aoai-lb/Cargo.toml
COPY crates/aoai-sim/Cargo.toml crates/aoai-sim/Cargo.toml
COPY crates/aoai-bench/Cargo.toml crates/aoai-bench/Cargo.toml
RUN for c in aoai-lb aoai-sim aoai-bench; do \
        mkdir -p crates/$c/src && echo 'fn main() {}' > crates/$c/src/main.rs && touch crates/$c/src/lib.rs; \
    done \
    && cargo build --release --locked -p aoai-lb \
    && rm -rf crates/*/src

COPY crates crates
# The stub build left newer timestamps on the stub outputs; touching the real
# sources makes cargo rebuild the workspace crates from them.
RUN find crates -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p aoai-lb \
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
