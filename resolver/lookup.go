package resolver

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
)

// noTTL is the TTL a lookuper reports when the answer carried none, as for
// /etc/hosts entries and IP literals. The refresh loop then uses
// DNSOptions.Refresh.
const noTTL time.Duration = -1

// Defaults of the DNS client.
const (
	defaultQueryTimeout = 2 * time.Second
	defaultAttempts     = 2
	// ednsSize is the EDNS0 UDP buffer advertised in queries, the value
	// DNS Flag Day 2020 recommends to avoid IP fragmentation. Larger
	// answers come back truncated and are retried over TCP.
	ednsSize = 1232
)

// A lookuper answers the DNS questions the refresh loop asks. It is the seam
// tests replace with a table-backed fake. Implementations must be safe for
// concurrent use.
//
// Both methods distinguish two kinds of "nothing":
//   - an authoritative empty answer (NXDOMAIN, or NOERROR without records)
//     is returned as an empty result and a nil error;
//   - a failure (timeout, SERVFAIL, REFUSED, network error) is returned as
//     a non-nil error.
//
// The TTL is the smallest TTL of the records the result came from, or of
// the SOA in a negative answer (RFC 2308 §5), or noTTL if unknown.
type lookuper interface {
	// lookupHost returns the IPv4 and IPv6 addresses of host.
	lookupHost(ctx context.Context, host string) ([]netip.Addr, time.Duration, error)
	// lookupSRV returns the SRV records of name with their targets'
	// addresses, for the records of the lowest priority that has
	// addresses only (see firstUsableGroup).
	lookupSRV(ctx context.Context, name string) ([]srvRecord, time.Duration, error)
}

// srvRecord is one SRV record (RFC 2782) with its target's addresses.
type srvRecord struct {
	target   string
	port     uint16
	priority uint16
	weight   uint16
	addrs    []netip.Addr
	dropped  []netip.Addr // addresses of target no backend can have (see usableAddrs)
}

// usableAddr reports whether a can be a backend's address: not
// unspecified, multicast or the IPv4 broadcast address (see usableAddrs).
func usableAddr(a netip.Addr) bool {
	return !a.IsUnspecified() && !a.IsMulticast() && a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// unusableKind names what keeps host, an IP literal, from being a
// backend's address (usableAddr): "unspecified IP", "multicast IP" or
// "broadcast IP"; "" for a usable IP or a host name.
func unusableKind(host string) string {
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return ""
	}
	switch ip = ip.Unmap(); {
	case usableAddr(ip):
		return ""
	case ip.IsUnspecified():
		return "unspecified IP"
	case ip.IsMulticast():
		return "multicast IP"
	}
	return "broadcast IP"
}

// usableAddrs returns addrs without the addresses no backend can have, and
// those separately: the unspecified addresses (0.0.0.0 and ::, which DNS
// filters answer for blocked names, and which a dial takes to this very
// host), multicast addresses and the IPv4 broadcast address, none of which
// takes a TCP connection. The registries' decoding refuses an unspecified
// IP the same way. It returns addrs itself when all are usable.
func usableAddrs(addrs []netip.Addr) (usable, dropped []netip.Addr) {
	bad := func(a netip.Addr) bool { return !usableAddr(a) }
	if !slices.ContainsFunc(addrs, bad) {
		return addrs, nil
	}
	for _, a := range addrs {
		if bad(a) {
			dropped = append(dropped, a)
		} else {
			usable = append(usable, a)
		}
	}
	return usable, dropped
}

// priorityGroups splits recs by priority, lowest priority first, keeping
// the order of records within a group.
func priorityGroups(recs []srvRecord) [][]srvRecord {
	sorted := slices.Clone(recs)
	slices.SortStableFunc(sorted, func(a, b srvRecord) int { return cmp.Compare(a.priority, b.priority) })
	var groups [][]srvRecord
	for i := 0; i < len(sorted); {
		j := i + 1
		for j < len(sorted) && sorted[j].priority == sorted[i].priority {
			j++
		}
		groups = append(groups, sorted[i:j:j])
		i = j
	}
	return groups
}

// srvLookupConcurrency bounds the target lookups of one SRV answer that
// run at once. One after the other, 100 targets from a server that takes
// 60 ms per answer made a lookup of 6 s, longer than the refresh.
const srvLookupConcurrency = 16

// firstUsableGroup fills in the addresses of the records of recs with
// resolve, one priority group at a time from the lowest priority, and
// returns the first group in which some target has addresses, or nil.
// RFC 2782: clients must use the targets of the lowest priority they can
// reach; higher priorities are fallbacks, not part of the balanced set. A
// group whose targets all vanished is as unreachable as it gets, so the
// next group takes over.
//
// The records of a group are resolved up to srvLookupConcurrency at a
// time, so resolve must be safe for concurrent use (each call gets its own
// record). The first error cancels the ctx handed to the calls still
// running and is returned.
func firstUsableGroup(ctx context.Context, recs []srvRecord, resolve func(ctx context.Context, r *srvRecord) error) ([]srvRecord, error) {
	for _, group := range priorityGroups(recs) {
		if err := resolveGroup(ctx, group, resolve); err != nil {
			return nil, err
		}
		if slices.ContainsFunc(group, func(r srvRecord) bool { return len(r.addrs) > 0 }) {
			return group, nil
		}
	}
	return nil, nil
}

// resolveGroup calls resolve for each record of group on up to
// srvLookupConcurrency goroutines, and returns the first error.
func resolveGroup(ctx context.Context, group []srvRecord, resolve func(ctx context.Context, r *srvRecord) error) error {
	gctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		next     atomic.Int64
		mu       sync.Mutex
		firstErr error // guarded by mu
		wg       sync.WaitGroup
	)
	for range min(len(group), srvLookupConcurrency) {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= len(group) || gctx.Err() != nil {
					return
				}
				if err := resolve(gctx, &group[i]); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
						cancel()
					}
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	if firstErr == nil {
		return ctx.Err()
	}
	return firstErr
}

// dnsClient asks a fixed list of DNS servers directly, over UDP with a retry
// over TCP when an answer is truncated (RFC 7766 §5), unlike net.Resolver,
// which does not report TTLs.
type dnsClient struct {
	servers  []string // "host:port", tried in order
	search   func(name string) []string
	timeout  time.Duration // per query
	attempts int           // passes over servers
}

// newDNSClient returns a client for servers. search expands a name into the
// FQDNs to try in order (the resolv.conf search list); nil means the name
// itself, made fully qualified.
func newDNSClient(servers []string, search func(string) []string, timeout time.Duration) *dnsClient {
	if search == nil {
		search = func(name string) []string { return []string{dns.Fqdn(name)} }
	}
	if timeout <= 0 {
		timeout = defaultQueryTimeout
	}
	return &dnsClient{servers: servers, search: search, timeout: timeout, attempts: defaultAttempts}
}

// exchange asks qname/qtype, trying each server in turn for up to attempts
// passes, and returns the first answer with rcode NOERROR or NXDOMAIN. Any
// other rcode, or a transport error, moves on to the next server, like
// glibc's resolver.
func (c *dnsClient) exchange(ctx context.Context, qname string, qtype uint16) (*dns.Msg, error) {
	var lastErr error
	for range c.attempts {
		for _, server := range c.servers {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			r, err := c.exchangeOne(ctx, server, qname, qtype)
			if err != nil {
				lastErr = fmt.Errorf("server %s: %w", server, err)
				continue
			}
			switch r.Rcode {
			case dns.RcodeSuccess, dns.RcodeNameError:
				return r, nil
			}
			lastErr = fmt.Errorf("server %s answered %s", server, rcodeString(r.Rcode))
		}
	}
	return nil, lastErr
}

// exchangeOne sends one query to server over UDP, and again over TCP if the
// answer was truncated.
func (c *dnsClient) exchangeOne(ctx context.Context, server, qname string, qtype uint16) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(qname, qtype)
	m.RecursionDesired = true
	m.SetEdns0(ednsSize, false)
	r, err := c.exchangeNet(ctx, "udp", server, m)
	if err != nil {
		return nil, err
	}
	if r.Truncated {
		r, err = c.exchangeNet(ctx, "tcp", server, m)
		if err == nil && r.Truncated {
			// Truncated over TCP too: what is missing is unknown, so an
			// answer without records says nothing about the name.
			return nil, errors.New("answer truncated over TCP too")
		}
		return r, err
	}
	return r, nil
}

// exchangeNet sends m to server over network, bounded by c.timeout and ctx.
// miekg/dns only honours ctx deadlines, so cancellation closes the
// connection to end a pending read at once.
func (c *dnsClient) exchangeNet(parent context.Context, network, server string, m *dns.Msg) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(parent, c.timeout)
	defer cancel()
	cl := &dns.Client{Net: network, Timeout: c.timeout, UDPSize: ednsSize}
	conn, err := cl.DialContext(ctx, server)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", network, err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	r, _, err := cl.ExchangeWithConnContext(ctx, m, conn)
	switch {
	case err == nil:
		return r, nil
	case parent.Err() != nil:
		return nil, fmt.Errorf("%s: %w", network, parent.Err())
	case ctx.Err() != nil || isTimeout(err):
		return nil, fmt.Errorf("%s: timeout after %v: %w", network, c.timeout, context.DeadlineExceeded)
	}
	return nil, fmt.Errorf("%s: %w", network, err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// lookupHost implements lookuper. It asks A and AAAA in parallel for each
// name of the search list until one has addresses. A failed AAAA query is
// ignored when A returned addresses, since many servers mishandle AAAA; any
// other failure is returned.
func (c *dnsClient) lookupHost(ctx context.Context, host string) ([]netip.Addr, time.Duration, error) {
	ttl := noTTL
	for _, name := range c.search(host) {
		addrs, nttl, err := c.lookupName(ctx, name)
		if err != nil {
			return nil, 0, fmt.Errorf("lookup %s: %w", strings.TrimSuffix(name, "."), err)
		}
		if len(addrs) > 0 {
			return addrs, nttl, nil
		}
		ttl = minTTL(ttl, nttl)
	}
	return nil, ttl, nil
}

// lookupName asks A and AAAA for one FQDN.
func (c *dnsClient) lookupName(ctx context.Context, name string) ([]netip.Addr, time.Duration, error) {
	type result struct {
		addrs []netip.Addr
		ttl   time.Duration
		err   error
	}
	var res [2]result
	var wg sync.WaitGroup
	for i, qtype := range []uint16{dns.TypeA, dns.TypeAAAA} {
		wg.Go(func() {
			r, err := c.exchangeChain(ctx, name, qtype)
			if err != nil {
				res[i].err = fmt.Errorf("%s: %w", dns.TypeToString[qtype], err)
				return
			}
			res[i].addrs, res[i].ttl = addressesOf(r, qtype)
		})
	}
	wg.Wait()
	a, aaaa := res[0], res[1]
	switch {
	case a.err != nil:
		return nil, 0, a.err
	case aaaa.err != nil && len(a.addrs) > 0:
		return a.addrs, a.ttl, nil
	case aaaa.err != nil:
		// A was empty, so the name may be IPv6-only: without AAAA we
		// cannot tell an empty set from a failure.
		return nil, 0, aaaa.err
	}
	return append(a.addrs, aaaa.addrs...), minTTL(a.ttl, aaaa.ttl), nil
}

// maxCNAMEQueries bounds the queries exchangeChain makes for one name,
// as a stub resolver bounds a CNAME chain it follows.
const maxCNAMEQueries = 8

// exchangeChain asks qname/qtype and, while the answer has no record of
// qtype but a CNAME chain from qname (an authoritative server leaves out
// the records of a target outside its zone), asks the chain's last name,
// up to maxCNAMEQueries queries. A chain that loops, within an answer or
// across queries, is a failure, as a recursive server answers SERVFAIL
// for it: taken as an empty answer, it emptied the set.
func (c *dnsClient) exchangeChain(ctx context.Context, qname string, qtype uint16) (*dns.Msg, error) {
	seen := map[string]bool{strings.ToLower(qname): true}
	name := qname
	for range maxCNAMEQueries {
		r, err := c.exchange(ctx, name, qtype)
		if err != nil || hasType(r.Answer, qtype) {
			return r, err
		}
		tail, err := cnameTail(r, name, seen)
		if err != nil || tail == "" {
			return r, err
		}
		name = tail
	}
	return nil, fmt.Errorf("CNAME chain from %s longer than %d queries", strings.TrimSuffix(qname, "."), maxCNAMEQueries)
}

// cnameTail follows the CNAME records of r's answer from name and returns
// the last name of the chain, "" when name has no CNAME. Names already in
// seen, to which it adds the chain's, are a loop.
func cnameTail(r *dns.Msg, name string, seen map[string]bool) (string, error) {
	next := make(map[string]string)
	for _, rr := range r.Answer {
		if cn, ok := rr.(*dns.CNAME); ok {
			next[strings.ToLower(cn.Hdr.Name)] = strings.ToLower(cn.Target)
		}
	}
	cur := strings.ToLower(name)
	tail := ""
	for {
		t, ok := next[cur]
		if !ok {
			return tail, nil
		}
		if seen[t] {
			return "", fmt.Errorf("CNAME loop at %s", strings.TrimSuffix(t, "."))
		}
		seen[t] = true
		cur, tail = t, t
	}
}

// addressesOf returns the addresses of type qtype in r's answer section and
// their smallest TTL, or, for an empty answer, the negative-caching TTL.
// Records of any owner are taken, so the tail of a CNAME chain counts.
func addressesOf(r *dns.Msg, qtype uint16) ([]netip.Addr, time.Duration) {
	var addrs []netip.Addr
	ttl := noTTL
	for _, rr := range r.Answer {
		var ip net.IP
		switch rr := rr.(type) {
		case *dns.A:
			if qtype == dns.TypeA {
				ip = rr.A
			}
		case *dns.AAAA:
			if qtype == dns.TypeAAAA {
				ip = rr.AAAA
			}
		case *dns.CNAME:
			ttl = minTTL(ttl, rrTTL(rr))
		}
		if a, ok := netip.AddrFromSlice(ip); ok {
			addrs = append(addrs, a.Unmap())
			ttl = minTTL(ttl, rrTTL(rr))
		}
	}
	if len(addrs) == 0 {
		return nil, negativeTTL(r)
	}
	return addrs, ttl
}

// negativeTTL returns how long a negative answer may be cached: the smaller
// of the SOA record's TTL and its minimum field (RFC 2308 §5), or noTTL.
func negativeTTL(r *dns.Msg) time.Duration {
	for _, rr := range r.Ns {
		if soa, ok := rr.(*dns.SOA); ok {
			return min(rrTTL(soa), time.Duration(soa.Minttl)*time.Second)
		}
	}
	return noTTL
}

// lookupSRV implements lookuper. Targets' addresses come from the
// additional section when the server sent them (RFC 2782), and from a
// follow-up A/AAAA lookup otherwise. A target that does not exist is
// skipped; a failed target lookup fails the whole lookup, because the set
// would otherwise shrink on a transient error.
func (c *dnsClient) lookupSRV(ctx context.Context, name string) ([]srvRecord, time.Duration, error) {
	ttl := noTTL
	var r *dns.Msg
	for _, qname := range c.search(name) {
		var err error
		r, err = c.exchange(ctx, qname, dns.TypeSRV)
		if err != nil {
			return nil, 0, fmt.Errorf("lookup %s: SRV: %w", strings.TrimSuffix(qname, "."), err)
		}
		if hasType(r.Answer, dns.TypeSRV) {
			break
		}
		ttl = minTTL(ttl, negativeTTL(r))
		r = nil
	}
	if r == nil {
		return nil, ttl, nil
	}
	ttl = noTTL
	var recs []srvRecord
	for _, rr := range r.Answer {
		srv, ok := rr.(*dns.SRV)
		if !ok {
			continue
		}
		if srv.Target == "." {
			continue // RFC 2782: "service decidedly not available" at this entry
		}
		if srv.Port == 0 {
			continue // no service listens on port 0, and a dial to it fails
		}
		ttl = minTTL(ttl, rrTTL(srv))
		recs = append(recs, srvRecord{
			target:   strings.ToLower(srv.Target),
			port:     srv.Port,
			priority: srv.Priority,
			weight:   srv.Weight,
		})
	}
	extra, extraTTL := additionalAddresses(r)
	// Follow-up lookups by target, each made once however many records
	// name it; the records' lookups run concurrently (firstUsableGroup).
	type targetLookup struct {
		done  chan struct{} // closed once the fields below are set
		addrs []netip.Addr
		err   error
	}
	var (
		mu       sync.Mutex // guards the two below
		resolved = make(map[string]*targetLookup)
		addrTTL  = noTTL
	)
	recs, err := firstUsableGroup(ctx, recs, func(ctx context.Context, rec *srvRecord) error {
		t := rec.target
		if a, err := netip.ParseAddr(strings.TrimSuffix(t, ".")); err == nil {
			// not standard, but harmless
			rec.addrs, rec.dropped = usableAddrs([]netip.Addr{a.Unmap()})
			return nil
		}
		if addrs := extra[t]; len(addrs) > 0 {
			rec.addrs, rec.dropped = usableAddrs(addrs)
			mu.Lock()
			addrTTL = minTTL(addrTTL, extraTTL[t])
			mu.Unlock()
			return nil
		}
		mu.Lock()
		l, ok := resolved[t]
		if !ok {
			l = &targetLookup{done: make(chan struct{})}
			resolved[t] = l
			mu.Unlock()
			var attl time.Duration
			l.addrs, attl, l.err = c.lookupName(ctx, dns.Fqdn(t))
			close(l.done)
			if l.err == nil && len(l.addrs) > 0 {
				mu.Lock()
				addrTTL = minTTL(addrTTL, attl)
				mu.Unlock()
			}
		} else {
			mu.Unlock()
			select {
			case <-l.done:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if l.err != nil {
			return fmt.Errorf("lookup SRV target %s: %w", strings.TrimSuffix(t, "."), l.err)
		}
		rec.addrs, rec.dropped = usableAddrs(l.addrs)
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	// addrTTL also covers groups passed over, whose targets may regain
	// addresses.
	return recs, minTTL(ttl, addrTTL), nil
}

// additionalAddresses collects the A and AAAA records of r's additional
// section by lower-case owner name, with each owner's smallest TTL.
func additionalAddresses(r *dns.Msg) (map[string][]netip.Addr, map[string]time.Duration) {
	addrs := make(map[string][]netip.Addr)
	ttls := make(map[string]time.Duration)
	for _, rr := range r.Extra {
		var ip net.IP
		switch rr := rr.(type) {
		case *dns.A:
			ip = rr.A
		case *dns.AAAA:
			ip = rr.AAAA
		default:
			continue
		}
		a, ok := netip.AddrFromSlice(ip)
		if !ok {
			continue
		}
		owner := strings.ToLower(rr.Header().Name)
		addrs[owner] = append(addrs[owner], a.Unmap())
		if old, ok := ttls[owner]; ok {
			ttls[owner] = minTTL(old, rrTTL(rr))
		} else {
			ttls[owner] = rrTTL(rr)
		}
	}
	return addrs, ttls
}

func hasType(rrs []dns.RR, t uint16) bool {
	return slices.ContainsFunc(rrs, func(rr dns.RR) bool { return rr.Header().Rrtype == t })
}

func rrTTL(rr dns.RR) time.Duration { return time.Duration(rr.Header().Ttl) * time.Second }

// minTTL returns the smaller of two TTLs, where noTTL means unknown.
func minTTL(a, b time.Duration) time.Duration {
	switch {
	case a == noTTL:
		return b
	case b == noTTL:
		return a
	}
	return min(a, b)
}

func rcodeString(rcode int) string {
	if s, ok := dns.RcodeToString[rcode]; ok {
		return s
	}
	return fmt.Sprintf("rcode %d", rcode)
}
