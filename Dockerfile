# syntax=docker/dockerfile:1
# Two stages: a static build, then the binary alone on distroless (no shell,
# no package manager), running as an unprivileged user.
#   docker build -t extauthz .
#   docker run --rm -p 9001:9001 -p 8080:8080 -p 9090:9090 extauthz
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/extauthz ./cmd/extauthz

FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=dev
LABEL org.opencontainers.image.title="extauthz" \
      org.opencontainers.image.description="Envoy external-authorization server for API keys" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/extauthz /extauthz
# The embedded default (no EXTAUTHZ_STORE) keeps its files here; production
# sets EXTAUTHZ_STORE and EXTAUTHZ_HMAC_SECRETS and needs no writable disk.
WORKDIR /home/nonroot
USER 65532:65532
# gRPC ext_authz + health, HTTP check mode + /healthz /readyz, /metrics
EXPOSE 9001 8080 9090
ENTRYPOINT ["/extauthz"]
