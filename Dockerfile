# syntax=docker/dockerfile:1
#
# docker build --build-arg VCS_REVISION=$(git rev-parse HEAD) -t streamlb:dev .
# docker build --build-arg VCS_REVISION=$(git rev-parse HEAD) --target dev -t streamlb-dev:dev .
#
# One static binary on distroless. The default target is the production
# image: `go build -tags proxyonly,grpcnotrace,urfave_cli_no_docs`, the proxy, validate and version commands
# only (about half the binary and of its resident memory; README "Build").
# The `dev` target carries every command, for the pods that run
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

# Every command (proxy, validate, version, testserver, demo, loadtest). BuildKit
# builds this stage only for --target dev.
FROM build AS build-dev
ARG TARGETOS
ARG TARGETARCH
# The build context leaves .git out, so the revision comes in as an
# argument; `streamlb version` prints it. (An ARG is scoped to its stage.)
ARG VCS_REVISION=
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    --mount=type=bind,target=. \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags="-s -w -X main.revision=${VCS_REVISION}" -o /out/streamlb .

FROM gcr.io/distroless/static-debian12:nonroot AS dev
COPY --from=build-dev /out/streamlb /streamlb
USER 65532:65532
ENTRYPOINT ["/streamlb"]

# The production binary: -tags proxyonly leaves out the development commands
# and what only they link (the embedded etcd server, ghz, the gRPC interop
# service); grpcnotrace and urfave_cli_no_docs leave out grpc-go's
# x/net/trace pages and urfave/cli's man-page generator, whose package
# initialisation allocates memory the proxy never uses (README "Build").
FROM build AS build-prod
ARG TARGETOS
ARG TARGETARCH
# The build context leaves .git out, so the revision comes in as an
# argument; `streamlb version` prints it. (An ARG is scoped to its stage.)
ARG VCS_REVISION=
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    --mount=type=bind,target=. \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -tags proxyonly,grpcnotrace,urfave_cli_no_docs -trimpath -ldflags="-s -w -X main.revision=${VCS_REVISION}" -o /out/streamlb .

# static-debian12 has no libc, no shell and no package manager; the :nonroot
# tag defaults to uid/gid 65532, which the Kubernetes manifests also pin
# (runAsUser: 65532, runAsNonRoot: true).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build-prod /out/streamlb /streamlb
USER 65532:65532
# 8080: gRPC (proxy --listen); 9901: admin, /healthz and /readyz
# (proxy --admin-listen). The testserver listens where --listen says.
EXPOSE 8080 9901
ENTRYPOINT ["/streamlb"]
