# The troupe binary in a small Debian image, as deploy/k8s/statefulset.yaml runs it:
#   docker build -t troupe:0.1.0 .
# (Not built in CI: the CI machine reaches package registries only, not image registries.)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin troupe

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data troupe \
    && mkdir -p /data && chown troupe /data
COPY --from=build /src/target/release/troupe /usr/local/bin/troupe
USER troupe
EXPOSE 8080 7100
ENTRYPOINT ["/usr/local/bin/troupe"]
CMD ["node", "--config", "/etc/troupe/node.toml"]
