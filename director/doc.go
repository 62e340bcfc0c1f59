// Package director picks a backend for each proxied stream.
//
// A [Director] receives backend sets from a resolver (it implements
// resolver.Updater) and answers Pick calls from the proxy (it satisfies the
// proxy's Picker interface structurally, without importing the proxy). Every
// set change builds a new immutable snapshot under a mutex and publishes it
// with an atomic pointer; Pick reads only the current snapshot and atomic
// counters, so it never blocks and never does I/O.
//
// Per-backend counters (in flight, successes, failures) live in a map keyed
// by address and survive snapshot rebuilds, after grpc-go's leastrequest
// balancer. Policies are small types that see only the usable backends of a
// snapshot: [RoundRobin] and [LeastRequest] today; weighted round robin,
// peak EWMA and ring hash, active health checks over grpc.health.v1 and
// outlier ejection are later additions that filter or reorder the same
// snapshot.
//
// The package leaves target parsing and discovery to package resolver and
// connections, framing and status mapping to the proxy.
package director
