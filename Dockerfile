# Multi-stage: build with the Rust toolchain, run on distroless (no shell,
# non-root). Tollgate needs no aws or kubectl binary at run time.
# Keep at or above Cargo.toml's rust-version.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml declares the benchmark target: cargo refuses a manifest whose
# targets are missing, even to build only the binary.
COPY benches ./benches
RUN cargo build --release --locked --bin tollgate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
USER 65532:65532
# 8080: Slack and probes (`listen`); 9090: metrics (`metrics_listen`).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
