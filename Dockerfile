# Multi-stage build of the redcloak binary. Not yet built in CI (no Docker
# engine here); the packaging issue adds the healthcheck and compose file.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/redcloak /usr/local/bin/redcloak
EXPOSE 6380
ENTRYPOINT ["/usr/local/bin/redcloak"]
CMD ["serve", "--config", "/etc/redcloak/redcloak.toml"]
