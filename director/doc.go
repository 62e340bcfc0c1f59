// Package director picks a backend for each proxied stream.
//
// A [Director] receives backend sets from a resolver (it implements
// resolver.Updater) and answers Pick calls from the proxy (it satisfies the
// proxy's Picker interface structurally, without importing the proxy). Every
// set change, health change, ejection, restoration and slow-start step
// builds a new immutable snapshot under a mutex and publishes it with an
// atomic pointer; Pick reads only the current snapshot and atomic counters
// (it rebuilds only when the snapshot has gone stale by the clock, and only
// if it gets the mutex without waiting), so it never blocks and never does
// I/O.
//
// # Policies
//
// Per-backend counters (in flight, successes, failures, the latency
// estimate) live in a map keyed by address and survive snapshot rebuilds,
// after grpc-go's leastrequest balancer. Policies are small types, one per
// file, that see only the pickable backends of a snapshot, never health or
// ejection state:
//   - [RoundRobin]: address order from a random offset.
//   - [WeightedRoundRobin]: shares proportional to resolver weights,
//     interleaved (earliest-deadline-first with half-step offsets, exact
//     over each cycle); the schedule is built once per snapshot, so a pick
//     is an atomic add.
//   - [Random]: uniform.
//   - [LeastRequest]: the fewest streams in flight among
//     [Config.ChoiceCount] random samples (gRFC A48).
//   - [PeakEWMA]: the lowest latency estimate × (in flight + 1) among the
//     samples, as in Linkerd and Finagle; latency is measured from Pick to
//     done on [Config.Now], failures count as at least
//     [Config.FailurePenalty].
//   - [RingHash]: consistent hashing of the [Config.HashHeader] value read
//     from the incoming metadata of Pick's context, so a key keeps its
//     backend and set changes move few keys.
//
// [Config.SlowStart] ramps up backends that join a running set or recover
// from failed health checks, through the weights of the rotation and
// random policies and by skipping for the P2C ones.
//
// # Health and ejection
//
// [Director.Run] runs active health checks over grpc.health.v1, one
// goroutine and connection per backend, following the set. A backend that
// answers NOT_SERVING, or fails [Config.UnhealthyThreshold] checks in a
// row, gets no new streams until [Config.HealthyThreshold] checks pass. New
// backends are healthy until a check says otherwise. If no backend is
// healthy, picks go to all of them (panic mode): the checks are more likely
// wrong than the whole set down, and failing every stream is the worst
// outcome.
//
// Passive outlier ejection, after Envoy's consecutive gateway-failure
// detection, leaves out of the snapshot a backend whose streams keep ending
// with codes.Unavailable, for a time that grows with repeated ejections;
// [Config.MaxEjectionPercent] bounds how much of the set can be out, and
// the last pickable (and last healthy) backend always stays. Run decides
// ejections and ends them on its timer, or earlier once the backend is
// known to be back: at a passing health check, or, without checks, for a
// first ejection that followed connection failures, at the first HTTP/2
// handshake its reconnect prober completes (uneject.go). Unavailable
// outcomes also call [Config.ResolveNow], so a DNS resolver can notice
// moved backends early.
//
// The package leaves target parsing and discovery to package resolver, and
// connections, framing, retries, concurrency limits and status mapping to
// the proxy.
package director
