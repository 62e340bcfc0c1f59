# syntax=docker/dockerfile:1
#
# docker build --build-arg VCS_REVISION=$(git rev-parse HEAD) -t streamlb:dev .
#
# One static binary on distroless: the same image runs `streamlb proxy`,
# `streamlb testserver` and `streamlb loadtest` (see deploy/kubernetes).

# The official golang images set GOTOOLCHAIN=local, so the image's Go must be
# at least the version on go.mod's `go` line.
ARG GO_VERSION=1.26

# The builder runs on the build machine's platform and cross-compiles for the
# target platform (docker buildx build --platform linux/amd64,linux/arm64),
# which CGO_ENABLED=0 makes trivial.
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src

# Download modules in a step that depends on go.mod and go.sum only, so a
# source change does not download them again; the cache mount keeps the
# module cache across builds and shares it with the build step.
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=bind,source=go.mod,target=go.mod \
    --mount=type=bind,source=go.sum,target=go.sum \
    go mod download

ARG TARGETOS
ARG TARGETARCH
# The build context leaves .git out, so the revision comes in as an
# argument; `streamlb version` prints it.
ARG VCS_REVISION=
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    --mount=type=bind,target=. \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags="-s -w -X main.revision=${VCS_REVISION}" -o /out/streamlb .

# static-debian12 has no libc, no shell and no package manager; the :nonroot
# tag defaults to uid/gid 65532, which the Kubernetes manifests also pin
# (runAsUser: 65532, runAsNonRoot: true).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/streamlb /streamlb
USER 65532:65532
# 8080: gRPC (proxy --listen); 9901: admin, /healthz and /readyz
# (proxy --admin-listen). The testserver listens where --listen says.
EXPOSE 8080 9901
ENTRYPOINT ["/streamlb"]
