// Package resolver turns user-supplied targets into backend sets and pushes
// them to an [Updater].
//
// A target is either a static "host:port" (optionally with a ";weight=N"
// suffix) or one of the DNS forms [ParseTarget] understands:
//
//   - "dns:///name:port" looks up A and AAAA records of name with the
//     system's configuration;
//   - "dns://dnshost:dnsport/name:port" asks that DNS server;
//   - "dns+srv:///_grpc._tcp.name" and "dns+srv://dnshost:dnsport/..." look
//     up SRV records, which carry each backend's port and weight (0 counts
//     as 1). Only the lowest priority whose targets have addresses forms
//     the set (RFC 2782); targets' addresses come from the additional
//     section, or from A/AAAA lookups when the server left it out;
//   - "etcd://host:port[,host:port...]/PREFIX[?format=F]" follows the keys
//     under PREFIX/ in etcd, as services register there with a lease, in
//     the formats of etcd's naming package, Kitex, go-zero, Kratos,
//     go-micro and dubbo-go (see [Etcd] and [EtcdFormats]);
//   - "zk://host:port[,host:port...]/PATH[?format=F]" follows the children
//     of the ZooKeeper node PATH, as services register there with an
//     ephemeral node, in the formats of Kitex, dubbo-go and Kratos (see
//     [ZK] and [ZKFormats]).
//
// Both registries can be reached over TLS, with a client certificate, and
// with credentials (etcd's users, ZooKeeper's digest ACLs): see
// [EtcdOptions] and [ZKOptions]. A refusal is a failure like an outage:
// the last set is kept, and the error names the cause.
//
// [Static] serves a fixed set, [DNS] follows one DNS target, [Etcd] one etcd
// prefix, [ZK] one ZooKeeper node, and [New]
// combines any mix of targets into one [Group]. [NewBuilder] offers the DNS
// refresh loop to plain grpc-go clients as a grpc-go resolver.
//
// # Following a headless service
//
// A Kubernetes headless service answers with one A record per ready pod.
// grpc-go's own DNS resolver re-resolves only after a connection breaks, so
// pods added by a scale-out get no traffic until something fails. [DNS]
// re-resolves periodically instead: every DNSOptions.Refresh (5s, Envoy's
// dns_refresh_rate), or at the answer's TTL with RespectTTL, each wait
// randomised by ±Jitter so a fleet of proxies does not query in lockstep.
// [DNS.ResolveNow] triggers an early lookup, coalesced and rate-limited; the
// director calls it when a backend connection fails.
//
// A set is pushed only when the sorted set of addresses and weights
// changed, and the change is logged at Info with the added and removed
// addresses.
//
// # Failures keep the set; empty answers empty it
//
// A failed lookup — a timeout, SERVFAIL, REFUSED or a network error — never
// empties the set. The last good set stays, the failure is logged at Warn
// and passed to Updater.ReportError, and lookups are retried with an
// exponential backoff (1s doubling to 30s) before the normal refresh
// resumes. A DNS outage therefore does not take the backends down with it.
//
// An authoritative empty answer — NXDOMAIN, or NOERROR without records —
// is different: it is the truth about the name, as when every pod of a
// headless service is gone, so the set becomes empty (logged at Warn).
// Keeping the old addresses would only send calls to pods that no longer
// exist, to fail after a connect timeout, or worse, to reach an unrelated
// pod that reused the IP. With an empty set the director answers
// UNAVAILABLE "no backend" at once, and the set refills as soon as DNS has
// records again. Such an answer counts whether or not it carries the AA
// bit, since a recursive resolver relays the authority's verdict.
//
// An AAAA failure is ignored when A returned addresses, since many servers
// mishandle AAAA (dnsmasq without upstream REFUSES it); otherwise it counts
// as a failed lookup, as an IPv6-only name cannot be told from an empty one
// without it.
//
// # The system resolver
//
// For "dns:///name" forms the package resolves as the C library would with
// the usual "hosts: files dns": /etc/hosts first (through Go's own hosts
// lookup, so names such as "localhost" resolve without any DNS traffic),
// then the name servers, search list and ndots of /etc/resolv.conf, queried
// directly with github.com/miekg/dns. Querying directly, rather than through
// net.Resolver, is what gives answers their TTLs, tells NXDOMAIN and NODATA
// from failures reliably, and retries over TCP when an answer is truncated,
// as a set of many pods is. /etc/resolv.conf is re-read on every lookup. If
// it names no servers, lookups fall back to net.DefaultResolver, without
// TTLs.
//
// # What it leaves to others
//
// The package stops at the backend set. Picking a backend per stream, health
// checking and outlier ejection belong to the director package, which
// implements [Updater]; connections belong to the proxy. resolver imports no
// other package of this module.
package resolver
