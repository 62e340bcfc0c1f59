// Package director picks a backend for each proxied stream.
//
// A [Director] receives backend sets from a resolver (it implements
// resolver.Updater) and answers Pick calls from the proxy (it satisfies the
// proxy's Picker interface structurally, without importing the proxy). Every
// set change, ejection and restoration builds a new immutable snapshot under
// a mutex and publishes it with an atomic pointer; Pick reads only the
// current snapshot and atomic counters (it rebuilds only to end a run-out
// ejection, and only if it gets the mutex without waiting), so it never
// blocks and never does I/O.
//
// Per-backend counters (in flight, successes, failures) live in a map keyed
// by address and survive snapshot rebuilds, after grpc-go's leastrequest
// balancer. Policies are small types that see only the usable backends of a
// snapshot: [RoundRobin] and [LeastRequest] today; weighted round robin,
// peak EWMA and ring hash, and active health checks over grpc.health.v1 are
// later additions that filter or reorder the same snapshot.
//
// Passive outlier ejection, after Envoy's consecutive gateway-failure
// detection, leaves out of the snapshot a backend whose streams keep ending
// with codes.Unavailable, for a time that grows with repeated ejections;
// [Config.MaxEjectionPercent] bounds how much of the set can be out, and
// the last pickable backend always stays. There is no timer goroutine: an
// ejection that has run out is undone by the next Pick that notices it.
//
// The package leaves target parsing and discovery to package resolver and
// connections, framing and status mapping to the proxy.
package director
