// Package testserver provides real gRPC backends for the streamlb proxy's
// tests, demos and load tests.
//
// A [Server] implements grpc-go's interop TestService
// (google.golang.org/grpc/interop/grpc_testing, service
// "grpc.testing.TestService"), the grpc.health.v1 health service and server
// reflection, so grpcurl and ghz can talk to it without .proto files.
//
// # Attribution
//
// Behind a proxy the peer address a client sees is the proxy's, so every
// TestService call reports the backend's name in response header metadata
// under [HeaderBackend] and in trailer metadata under [TrailerBackend].
// [BackendFromHeader] extracts it on the client side. UnaryCall also fills
// SimpleResponse.Hostname and SimpleResponse.ServerId with the name.
//
// # Per-call knobs (request metadata)
//
//   - "x-delay: <Go duration>" adds latency before the handler runs.
//   - "x-hang: 1" blocks until the call's context is done.
//   - "x-fail-code: <int>" with optional "x-fail-message: <text>" (or the
//     binary "x-fail-message-bin" for non-ASCII text) fails the call with
//     that status instead of running the handler.
//   - Keys prefixed "x-echo-" are echoed in response headers and keys
//     prefixed "x-echo-trailer-" in trailers, binary ("-bin") keys included.
//
// Request messages carry the interop knobs: response sizes, IntervalUs
// between streamed responses, and ResponseStatus to end a call with a given
// status.
//
// # Per-server knobs ([Config])
//
// Latency is added to every call, ErrorRate fails that fraction of calls with
// ErrorCode, and handler function fields (after grpc-go's internal stubserver)
// replace the built-in behaviour of single methods. Health can be flipped
// with [Server.SetServing].
//
// # Observability
//
// The server counts calls started, calls per method, calls in flight and
// calls that saw their context cancelled, and calls [Config.OnCancel] so
// tests can wait for cancellation to reach the backend without sleeping.
// Only TestService calls are counted and subject to knobs; health and
// reflection calls are not, so active health checking does not skew the
// per-backend distribution.
//
// # What it leaves to others
//
// Balancing, proxying and health checking of backends belong to the proxy and
// director packages. This package imports nothing else of streamlb's.
//
// Payload bodies sent by the server follow the pattern produced by
// [PayloadBody], so a client can detect corruption or reordering of bytes
// along the path with [CheckPayloadBody].
package testserver
