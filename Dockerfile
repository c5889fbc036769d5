# redcloak container image: a multi-stage build; the runtime image is
# distroless (no shell, no package manager) and runs as a non-root user.
#
#   docker build -t redcloak .
#   docker run --rm redcloak --help
#
# Ports: 6380 plaintext RESP (keep it on loopback or the pod's network
# namespace), 6390 the optional TLS listener, 9187 /metrics, /healthz, /readyz.
# Mount the config at /etc/redcloak/redcloak.toml, certificates and secrets
# read-only (see docker-compose.yml and deploy/kubernetes/).

FROM rust:1-bookworm AS build
WORKDIR /src
# The commit for the redcloak_build_info metric (the build context has no .git).
ARG BUILD_INFO_GIT_SHA=unknown
ENV BUILD_INFO_GIT_SHA=${BUILD_INFO_GIT_SHA}
COPY . .
RUN cargo build --release --locked \
    && mkdir -p /out/certs /out/etc/redcloak \
    && cp target/release/redcloak /out/redcloak

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/redcloak /usr/local/bin/redcloak
# An empty /certs owned by the runtime user: `redcloak certs dev --out /certs`
# can fill a fresh volume mounted there.
COPY --from=build --chown=65532:65532 /out/certs /certs
COPY --from=build /out/etc/redcloak /etc/redcloak
USER 65532:65532
EXPOSE 6380 6390 9187
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/usr/local/bin/redcloak", "health", "--url", "http://127.0.0.1:9187/readyz"]
ENTRYPOINT ["/usr/local/bin/redcloak"]
CMD ["serve", "--config", "/etc/redcloak/redcloak.toml"]
