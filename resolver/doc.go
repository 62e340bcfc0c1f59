// Package resolver turns user-supplied targets into backend sets and pushes
// them to an [Updater].
//
// A target is either a static "host:port" (optionally with a ";weight=N"
// suffix) or one of the DNS forms "dns:///name:port",
// "dns://dnshost:dnsport/name:port" and "dns+srv:///_grpc._tcp.name".
// [ParseTarget] understands all of them; today only static targets can be
// resolved, by [Static]. DNS re-resolution, with its refresh loop, backoff and
// coalescing "resolve now" trigger, is a later addition behind the same
// [Resolver] interface.
//
// The package stops at the backend set. Picking a backend per stream, health
// checking and outlier ejection belong to the director package, which
// implements [Updater]; connections belong to the proxy. resolver imports no
// other package of this module.
package resolver
