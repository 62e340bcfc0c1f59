// Package proxy is streamlb's data plane: it accepts gRPC calls over
// cleartext HTTP/2 (h2c with prior knowledge), asks a Picker for a backend
// for every stream, and relays the call to that backend.
//
// Two engines share the Picker seam:
//
//   - Server, the frame engine, relays HTTP/2 frames with
//     golang.org/x/net/http2's Framer and hpack. It never decodes a gRPC
//     message: DATA bytes go through as they came, so any codec,
//     compression or message size passes untouched (it follows the 5-byte
//     message prefixes of responses, only so that a backend dying mid-message
//     does not leave the client half a message). Each connection has one
//     reader goroutine and one writer goroutine, and a backend connection a
//     third for keepalive PINGs and idle close; streams are entries in the
//     connection's table, not goroutines. Flow control is end to end
//     (RFC 9113 §5.2): a window is granted to a sender only as its bytes are
//     handed on to the receiver, so every stream's buffer is bounded.
//   - Reference, the message-level engine built on mwitkow/grpc-proxy, with
//     a goroutine pair per stream. It exists for differential tests and as a
//     baseline in benchmarks.
//
// Calls the proxy ends itself (no backend, connection refused or lost,
// deadline, limits, malformed requests) get their gRPC status from one
// place, status.go; statuses that come from a backend are relayed
// untouched.
//
// The package knows nothing of discovery or balancing policies: those live
// in the resolver and director packages, which main wires to a Picker. A
// Picker over several groups of backends with their own dial settings and
// retry policies (the clusters of a configuration file) implements
// UpstreamPicker and names each pick's Upstream; the frame engine pools
// backend connections per Upstream and address (upstream.go). Such a pick
// may also carry its route's timeout (UpstreamPick.Timeout), which both
// engines enforce on the call's one deadline, the client's grpc-timeout's
// if that is earlier.
package proxy
