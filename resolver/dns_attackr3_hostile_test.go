package resolver

import (
	"fmt"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// hostileDNS is a DNS server on loopback whose every answer comes from a
// function the test sets, for answers no well-behaved server gives.
type hostileDNS struct {
	addr    string
	queries atomic.Int64
}

// startHostileDNS serves handle over UDP and TCP on 127.0.0.1 (port from
// the kernel) until cleanup.
func startHostileDNS(t *testing.T, handle func(w dns.ResponseWriter, q *dns.Msg)) *hostileDNS {
	t.Helper()
	h := &hostileDNS{}
	var pc net.PacketConn
	var ln net.Listener
	for range 20 {
		p, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		l, err := net.Listen("tcp", p.LocalAddr().String())
		if err != nil {
			p.Close()
			continue
		}
		pc, ln = p, l
		break
	}
	if pc == nil {
		t.Fatal("no UDP and TCP port pair")
	}
	h.addr = pc.LocalAddr().String()
	mux := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		h.queries.Add(1)
		handle(w, q)
	})
	udp := &dns.Server{PacketConn: pc, Handler: mux}
	tcp := &dns.Server{Listener: ln, Handler: mux}
	started := make(chan struct{}, 2)
	udp.NotifyStartedFunc = func() { started <- struct{}{} }
	tcp.NotifyStartedFunc = func() { started <- struct{}{} }
	done := make(chan struct{}, 2)
	go func() { udp.ActivateAndServe(); done <- struct{}{} }()
	go func() { tcp.ActivateAndServe(); done <- struct{}{} }()
	<-started
	<-started
	t.Cleanup(func() {
		udp.Shutdown()
		tcp.Shutdown()
		<-done
		<-done
	})
	return h
}

// reply answers q with rrs, truncated (TC) over UDP when they do not fit
// the client's EDNS0 size, as a real server does.
func reply(w dns.ResponseWriter, q *dns.Msg, rrs ...dns.RR) {
	m := new(dns.Msg)
	m.SetReply(q)
	m.Authoritative = true
	m.Answer = rrs
	if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
		size := dns.MinMsgSize
		if o := q.IsEdns0(); o != nil {
			size = int(o.UDPSize())
		}
		m.Truncate(size)
	}
	w.WriteMsg(m)
}

func aRR(name string, ip net.IP, ttl uint32) dns.RR {
	return &dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: ttl}, A: ip}
}

func srvRR(name, target string, port uint16, ttl uint32) dns.RR {
	return &dns.SRV{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeSRV, Class: dns.ClassINET, Ttl: ttl}, Target: target, Port: port, Weight: 1}
}

// TestAttackR3DNSSRVAmplification: an SRV answer of 1,000 records, each
// on its own port and all naming one target, and that target with 1,000 A
// records: two answers of under 64 KiB each (over TCP) become a set of
// 1,000 × 1,000 = 1,000,000 backends, handed to the director in one
// UpdateState. The set must be bounded.
func TestAttackR3DNSSRVAmplification(t *testing.T) {
	const maxSet = 10000 // the limit the fix sets (MaxAddresses)
	const srvs, as = 1000, 1000
	h := startHostileDNS(t, func(w dns.ResponseWriter, q *dns.Msg) {
		name := q.Question[0].Name
		switch q.Question[0].Qtype {
		case dns.TypeSRV:
			var rrs []dns.RR
			for i := range srvs {
				rrs = append(rrs, srvRR(name, "h.amp.test.", uint16(20000+i), 30))
			}
			reply(w, q, rrs...)
		case dns.TypeA:
			var rrs []dns.RR
			for i := range as {
				rrs = append(rrs, aRR(name, net.IPv4(10, 1, byte(i>>8), byte(i)), 30))
			}
			reply(w, q, rrs...)
		default:
			reply(w, q)
		}
	})
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	_, u, _ := startWireDNS(t, "dns+srv://"+h.addr+"/_grpc._tcp.amp.test", DNSOptions{Refresh: time.Hour})
	ctx := within(t, 30*time.Second)
	u.waitFor(ctx, t, "a set or an error", func() bool {
		states, errs := u.snapshot()
		return len(states) > 0 || len(errs) > 0
	})
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	states, errs := u.snapshot()
	n := 0
	if len(states) > 0 {
		n = len(states[0].Addresses)
	}
	t.Logf("after %v: %d backends, %d errors, %d queries, %.1f MiB allocated", time.Since(start).Round(time.Millisecond), n, len(errs), h.queries.Load(), float64(after.TotalAlloc-before.TotalAlloc)/(1<<20))
	if n > maxSet {
		t.Errorf("the answers made a set of %d backends, want at most %d", n, maxSet)
	}
	if len(errs) > 0 && !strings.Contains(errs[0].Error(), fmt.Sprint(maxSet)) {
		t.Errorf("error %q does not name the limit %d", errs[0], maxSet)
	}
}

func aaaaRR(name string, ip net.IP, ttl uint32) dns.RR {
	return &dns.AAAA{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: ttl}, AAAA: ip}
}

// TestAttackR3DNSUnusableAddresses: answers with addresses no backend can
// have. DNS filters (Pi-hole, many corporate resolvers) answer a blocked
// name with 0.0.0.0 or ::, and dialing 0.0.0.0:port on Linux reaches this
// very host: the proxy would send the calls to whatever listens on the
// port locally, itself included. Multicast and the broadcast address take
// no TCP connection. The registries' decoding refuses an unspecified IP
// already; DNS answers must not bring them in either, through A/AAAA,
// through an SRV answer's additional section, or through an SRV target
// written as an IP.
func TestAttackR3DNSUnusableAddresses(t *testing.T) {
	bad := []net.IP{net.IPv4zero, net.IPv4(224, 0, 0, 1), net.IPv4bcast, net.IPv6unspecified, net.ParseIP("ff02::1")}
	h := startHostileDNS(t, func(w dns.ResponseWriter, q *dns.Msg) {
		name := q.Question[0].Name
		var rrs []dns.RR
		switch q.Question[0].Qtype {
		case dns.TypeA:
			rrs = append(rrs, aRR(name, net.IPv4(10, 0, 0, 1), 30))
			for _, ip := range bad {
				if ip.To4() != nil {
					rrs = append(rrs, aRR(name, ip, 30))
				}
			}
		case dns.TypeAAAA:
			for _, ip := range bad {
				if ip.To4() == nil {
					rrs = append(rrs, aaaaRR(name, ip, 30))
				}
			}
		case dns.TypeSRV:
			rrs = append(rrs, srvRR(name, "good.test.", 9000, 30), srvRR(name, "0.0.0.0.", 9001, 30), srvRR(name, "blocked.test.", 9002, 30))
			m := new(dns.Msg)
			m.SetReply(q)
			m.Answer = rrs
			m.Extra = []dns.RR{aRR("good.test.", net.IPv4(10, 0, 0, 2), 30), aRR("blocked.test.", net.IPv4zero, 30)}
			w.WriteMsg(m)
			return
		}
		reply(w, q, rrs...)
	})
	for _, tc := range []struct {
		name, target string
		want         []string
	}{
		{"A and AAAA", "dns://" + h.addr + "/blocked.test:443", []string{"10.0.0.1:443"}},
		{"SRV", "dns+srv://" + h.addr + "/_grpc._tcp.blocked.test", []string{"10.0.0.2:9000;weight=1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, u, _ := startWireDNS(t, tc.target, DNSOptions{Refresh: time.Hour})
			ctx := within(t, 10*time.Second)
			u.waitFor(ctx, t, "a set or an error", func() bool {
				states, errs := u.snapshot()
				return len(states) > 0 || len(errs) > 0
			})
			got, _ := u.last()
			if !slices.Equal(got, tc.want) {
				t.Errorf("set = %v, want %v", got, tc.want)
			}
		})
	}
}

// startSlowSRV serves an SRV answer of n targets t0.DOMAIN, t1.DOMAIN...
// on port 9000, each target's A (10.3.x.y) and AAAA (none) answered once
// slow returns.
func startSlowSRV(t *testing.T, domain string, n int, slow func()) *hostileDNS {
	return startHostileDNS(t, func(w dns.ResponseWriter, q *dns.Msg) {
		name := q.Question[0].Name
		switch q.Question[0].Qtype {
		case dns.TypeSRV:
			var rrs []dns.RR
			for i := range n {
				rrs = append(rrs, srvRR(name, fmt.Sprintf("t%d.%s", i, domain), 9000, 30))
			}
			reply(w, q, rrs...)
		case dns.TypeA:
			slow()
			var i int
			fmt.Sscanf(name, "t%d.", &i)
			reply(w, q, aRR(name, net.IPv4(10, 3, byte(i>>8), byte(i)), 30))
		default:
			slow()
			reply(w, q)
		}
	})
}

// TestAttackR3DNSSlowSRVTargets: an SRV answer naming 100 targets without
// their addresses, from a server that takes 60 ms over each A and AAAA
// answer (a loaded or distant resolver; each well within the 2 s query
// timeout). The targets were looked up one after the other, so one
// lookup took 100 × 60 ms = 6 s, longer than the 5 s refresh, and
// nothing bounded it: 1,000 targets at 1.9 s each would hold the resolver
// in one lookup for half an hour, the set unchanged. The lookups must
// overlap.
func TestAttackR3DNSSlowSRVTargets(t *testing.T) {
	t.Parallel()
	const targets, delay = 100, 60 * time.Millisecond
	// inFlight and peak count the target queries the server holds at once:
	// one at a time before, up to srvLookupConcurrency targets' A and
	// AAAA queries now.
	var inFlight, peak atomic.Int32
	slow := func() {
		n := inFlight.Add(1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		time.Sleep(delay)
		inFlight.Add(-1)
	}
	h := startSlowSRV(t, "slow.test.", targets, slow)
	start := time.Now()
	_, u, _ := startWireDNS(t, "dns+srv://"+h.addr+"/_grpc._tcp.slow.test", DNSOptions{Refresh: time.Hour})
	u.waitFor(within(t, 30*time.Second), t, "a set or an error", func() bool {
		states, errs := u.snapshot()
		return len(states) > 0 || len(errs) > 0
	})
	got, _ := u.last()
	t.Logf("%d targets answered after %v each: %d backends after %v, at most %d queries at once", targets, delay, len(got), time.Since(start).Round(time.Millisecond), peak.Load())
	if len(got) != targets {
		t.Errorf("set of %d backends, want %d", len(got), targets)
	}
	// The overlap, not the time it saves, is asserted: this machine's
	// timing moves too much for a test.
	if p := peak.Load(); p < 4 || p > 2*srvLookupConcurrency {
		t.Errorf("at most %d target queries at once, want the targets' lookups to overlap, at most %d at a time (A and AAAA each)", p, srvLookupConcurrency)
	}
}

// TestAttackR3BadPortsAndMulticast: an SRV record with port 0 (RFC 2782
// gives it no meaning; nothing listens there) made a backend "ip:0", and
// the registries took multicast and broadcast addresses, which no TCP
// connection reaches, where the DNS answers now leave them out.
func TestAttackR3BadPortsAndMulticast(t *testing.T) {
	t.Run("SRV port 0", func(t *testing.T) {
		h := startHostileDNS(t, func(w dns.ResponseWriter, q *dns.Msg) {
			name := q.Question[0].Name
			if q.Question[0].Qtype != dns.TypeSRV {
				reply(w, q)
				return
			}
			m := new(dns.Msg)
			m.SetReply(q)
			m.Answer = []dns.RR{srvRR(name, "a.test.", 0, 30), srvRR(name, "b.test.", 9000, 30)}
			m.Extra = []dns.RR{aRR("a.test.", net.IPv4(10, 0, 0, 1), 30), aRR("b.test.", net.IPv4(10, 0, 0, 2), 30)}
			w.WriteMsg(m)
		})
		_, u, _ := startWireDNS(t, "dns+srv://"+h.addr+"/_grpc._tcp.port0.test", DNSOptions{Refresh: time.Hour})
		u.waitFor(within(t, 10*time.Second), t, "a set", func() bool { _, ok := u.last(); return ok })
		if got, _ := u.last(); !slices.Equal(got, []string{"10.0.0.2:9000;weight=1"}) {
			t.Errorf("set = %v, want only the record with a port", got)
		}
	})
	t.Run("registries", func(t *testing.T) {
		for _, s := range []string{"224.0.0.1:80", "255.255.255.255:80", "[ff02::1]:80"} {
			if as, err := decodeHostPort(s, 0); err == nil {
				t.Errorf("decodeHostPort(%q) = %v, want an error", s, as)
			}
		}
	})
}

func cnameRR(name, target string, ttl uint32) dns.RR {
	return &dns.CNAME{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeCNAME, Class: dns.ClassINET, Ttl: ttl}, Target: target}
}

// TestAttackR3DNSCNAMEs: an answer that is only a CNAME, whose target's
// records the server left out (an authoritative server does, for a target
// outside its zone), was taken for an authoritative empty answer and
// emptied the set, where a stub resolver asks for the target. A CNAME
// loop emptied it too, where a recursive server answers SERVFAIL: it is
// a broken zone, and the last set must be kept.
func TestAttackR3DNSCNAMEs(t *testing.T) {
	var mode atomic.Int64 // 0: A records; 1: a CNAME to out.test.; 2: a CNAME loop
	h := startHostileDNS(t, func(w dns.ResponseWriter, q *dns.Msg) {
		name := q.Question[0].Name
		if q.Question[0].Qtype != dns.TypeA {
			reply(w, q)
			return
		}
		switch {
		case name == "out.test.":
			reply(w, q, aRR(name, net.IPv4(10, 0, 0, 9), 30))
		case mode.Load() == 0:
			reply(w, q, aRR(name, net.IPv4(10, 0, 0, 1), 30))
		case mode.Load() == 1:
			reply(w, q, cnameRR(name, "out.test.", 30))
		default:
			reply(w, q, cnameRR(name, "b.test.", 30), cnameRR("b.test.", name, 30))
		}
	})
	_, u, _ := startWireDNS(t, "dns://"+h.addr+"/svc.test:443", DNSOptions{Refresh: 50 * time.Millisecond})
	ctx := within(t, 10*time.Second)
	u.waitSet(ctx, t, "10.0.0.1:443")

	mode.Store(2)
	u.waitFor(ctx, t, "a new set or an error", func() bool {
		states, errs := u.snapshot()
		return len(states) > 1 || len(errs) > 0
	})
	if got, _ := u.last(); !slices.Equal(got, []string{"10.0.0.1:443"}) {
		t.Errorf("after a CNAME loop the set is %v, want the last one kept", got)
	}
	if _, errs := u.snapshot(); len(errs) == 0 || !strings.Contains(errs[0].Error(), "CNAME loop") {
		t.Errorf("errors = %v, want one naming the CNAME loop", errs)
	}

	mode.Store(1)
	u.waitSet(within(t, 5*time.Second), t, "10.0.0.9:443")
}

// TestAttackR3DNSSilentOrTruncating: after a good answer the server
// stops answering, or answers every UDP query truncated (TC) and every
// TCP query with TC too: each lookup fails within its query timeouts and
// the last set is kept.
func TestAttackR3DNSSilentOrTruncating(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(w dns.ResponseWriter, q *dns.Msg)
	}{
		{"silent", func(w dns.ResponseWriter, q *dns.Msg) {}},
		{"always truncated", func(w dns.ResponseWriter, q *dns.Msg) {
			m := new(dns.Msg)
			m.SetReply(q)
			m.Truncated = true
			w.WriteMsg(m)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var broken atomic.Bool
			h := startHostileDNS(t, func(w dns.ResponseWriter, q *dns.Msg) {
				if broken.Load() {
					tc.break_(w, q)
					return
				}
				if q.Question[0].Qtype == dns.TypeA {
					reply(w, q, aRR(q.Question[0].Name, net.IPv4(10, 0, 0, 1), 30))
					return
				}
				reply(w, q)
			})
			const qt = 100 * time.Millisecond
			_, u, _ := startWireDNS(t, "dns://"+h.addr+"/svc.test:443", DNSOptions{Refresh: 50 * time.Millisecond, QueryTimeout: qt})
			u.waitSet(within(t, 5*time.Second), t, "10.0.0.1:443")
			broken.Store(true)
			start := time.Now()
			u.waitFor(within(t, 5*time.Second), t, "an error", func() bool { _, errs := u.snapshot(); return len(errs) > 0 })
			_, errs := u.snapshot()
			t.Logf("error after %v: %v", time.Since(start).Round(time.Millisecond), errs[0])
			if got, _ := u.last(); !slices.Equal(got, []string{"10.0.0.1:443"}) {
				t.Errorf("set = %v, want the last one kept", got)
			}
		})
	}
}

// TestAttackR3DNSLookupBound: a lookup had no bound as a whole, only its
// queries had (QueryTimeout): a server answering each of an SRV answer's
// many targets just inside the query timeout held one lookup, and the set
// it would bring, for as long as it liked (thousands of targets at 2 s
// each, 16 at a time: minutes). Here 400 targets answered after 60 ms
// each take 1.5 s to look up, and the lookup is bounded at 500 ms: it
// must fail with the bound named, and no set come from it.
func TestAttackR3DNSLookupBound(t *testing.T) {
	t.Parallel()
	const targets, delay = 400, 60 * time.Millisecond
	h := startSlowSRV(t, "bound.test.", targets, func() { time.Sleep(delay) })
	_, u, _ := startWireDNS(t, "dns+srv://"+h.addr+"/_grpc._tcp.bound.test", DNSOptions{Refresh: time.Hour, LookupTimeout: 500 * time.Millisecond})
	u.waitFor(within(t, 30*time.Second), t, "a set or an error", func() bool {
		states, errs := u.snapshot()
		return len(states) > 0 || len(errs) > 0
	})
	states, errs := u.snapshot()
	if len(states) > 0 {
		t.Errorf("a set of %d backends came from a lookup past its bound, want none", len(states[len(states)-1].Addresses))
	}
	if len(errs) == 0 || !strings.Contains(errs[0].Error(), "longer than its bound, 500ms") {
		t.Errorf("errors = %v, want the lookup's bound (500ms) named", errs)
	}
}
