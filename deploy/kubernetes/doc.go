// Package kubernetes holds no code: the directory is the Kubernetes demo of
// streamlb in front of a headless Service (manifests, kustomization.yaml and
// README.md), and its test.
//
// The test decodes every manifest strictly into the typed k8s.io/api structs,
// so that a misspelt field fails here rather than being dropped by the API
// server, and checks the invariants the demo depends on: the backend Service
// is headless and the proxy's --backend names it, every container runs
// non-root with a read-only root filesystem, resources and probes, the
// grace period outlasts the proxy's drain, and Services and containers agree
// on ports. It also checks the Dockerfile at the repository root. Nothing
// here talks to a cluster.
package kubernetes
