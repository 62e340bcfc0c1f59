// Package loadtest drives load through the proxy and reports where calls
// landed.
//
// Behind the proxy a client sees only the proxy's address, so attribution
// comes from the backends themselves: every testserver names itself in the
// x-backend response header (testserver.HeaderBackend), and the reports
// count calls per name.
//
// Run is `streamlb loadtest`: ghz (github.com/bojand/ghz/runner) as a
// library sends the load, and a read-only tap on the client's HTTP/2
// connections (tap.go, h2tap.go) records each call's backend header,
// status, wire latency and end time, which ghz itself does not expose (ghz
// v0.121.0 takes no dial options, so no grpc stats.Handler of ours can see
// response headers). From those come the per-backend rows and a timeline of
// calls and errors per backend per interval. Latencies are on two named
// clocks, the client's (ghz) and the wire's (the tap); see Result. The
// Result renders as a table, JSON or a self-contained HTML page, and
// CheckBalance and CheckErrorRate gate CI jobs.
//
// RunDemo is `streamlb demo`, the headless-service demo: an embedded DNS
// server, testservers as pods, the frame proxy re-resolving the name, and a
// direct grpc-go client beside it for comparison. Because the demo builds
// its own proxy, this package imports proxy, director and resolver besides
// testserver; main still wires the real proxy command.
//
// The package leaves balancing to the director and relaying to the proxy; it
// only sends calls and counts answers.
package loadtest
