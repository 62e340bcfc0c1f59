package testserver

import (
	"context"
	"log/slog"
	"net"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/miekg/dns"
)

// startDNS starts a DNSServer with cfg on loopback, stopped at cleanup.
func startDNS(t *testing.T, cfg DNSConfig) *DNSServer {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := NewDNSServer(cfg)
	if err := s.Start("127.0.0.1:0"); err != nil {
		t.Fatalf("Start() error = %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}

// query sends one question to s over network ("udp" or "tcp").
func query(t *testing.T, s *DNSServer, network, name string, qtype uint16) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	c := &dns.Client{Net: network, Timeout: 5 * time.Second}
	r, _, err := c.Exchange(m, s.Addr())
	if err != nil {
		t.Fatalf("query %s %s over %s: %v", name, dns.TypeToString[qtype], network, err)
	}
	return r
}

// rrStrings renders records without TTLs for comparison.
func rrStrings(rrs []dns.RR) []string {
	var out []string
	for _, rr := range rrs {
		switch rr := rr.(type) {
		case *dns.A:
			out = append(out, "A "+rr.Hdr.Name+" "+rr.A.String())
		case *dns.AAAA:
			out = append(out, "AAAA "+rr.Hdr.Name+" "+rr.AAAA.String())
		case *dns.SRV:
			out = append(out, strings.Join([]string{"SRV", rr.Hdr.Name, rr.Target,
				itoa(rr.Port), itoa(rr.Priority), itoa(rr.Weight)}, " "))
		case *dns.SOA:
			out = append(out, "SOA "+rr.Hdr.Name)
		case *dns.OPT:
			// EDNS0 pseudo-record; not data.
		default:
			out = append(out, rr.String())
		}
	}
	sort.Strings(out)
	return out
}

func itoa(n uint16) string { return strconv.Itoa(int(n)) }

func TestDNSServerAnswers(t *testing.T) {
	t.Parallel()
	s := startDNS(t, DNSConfig{})
	s.SetA("Pods.Example.", "10.0.0.1", "10.0.0.2", "2001:db8::1")
	s.SetA("empty.example")
	s.SetA("a.example", "10.0.1.1")
	s.SetA("b.example", "10.0.1.2", "2001:db8::2")
	s.SetSRV("_grpc._tcp.svc.example",
		SRV{Target: "a.example", Port: 8080, Priority: 0, Weight: 10},
		SRV{Target: "b.example.", Port: 8081, Priority: 0, Weight: 0},
		SRV{Target: "unknown.example", Port: 8082, Priority: 1, Weight: 5},
	)

	tests := []struct {
		name      string
		qname     string
		qtype     uint16
		wantRcode int
		wantAns   []string
		wantExtra []string
	}{
		{
			name: "A", qname: "pods.example", qtype: dns.TypeA,
			wantAns: []string{"A pods.example. 10.0.0.1", "A pods.example. 10.0.0.2"},
		},
		{
			name: "A case-insensitive", qname: "PODS.EXAMPLE.", qtype: dns.TypeA,
			wantAns: []string{"A PODS.EXAMPLE. 10.0.0.1", "A PODS.EXAMPLE. 10.0.0.2"},
		},
		{name: "AAAA", qname: "pods.example", qtype: dns.TypeAAAA, wantAns: []string{"AAAA pods.example. 2001:db8::1"}},
		{name: "NODATA A", qname: "empty.example", qtype: dns.TypeA},
		{name: "NODATA AAAA of v4-only name", qname: "a.example", qtype: dns.TypeAAAA},
		{name: "NODATA other type", qname: "pods.example", qtype: dns.TypeTXT},
		{name: "NXDOMAIN", qname: "missing.example", qtype: dns.TypeA, wantRcode: dns.RcodeNameError},
		{
			name: "SRV with additional", qname: "_grpc._tcp.svc.example", qtype: dns.TypeSRV,
			wantAns: []string{
				"SRV _grpc._tcp.svc.example. a.example. 8080 0 10",
				"SRV _grpc._tcp.svc.example. b.example. 8081 0 0",
				"SRV _grpc._tcp.svc.example. unknown.example. 8082 1 5",
			},
			wantExtra: []string{"A a.example. 10.0.1.1", "A b.example. 10.0.1.2", "AAAA b.example. 2001:db8::2"},
		},
		{name: "SRV NODATA", qname: "pods.example", qtype: dns.TypeSRV},
	}
	for _, network := range []string{"udp", "tcp"} {
		for _, tc := range tests {
			t.Run(network+"/"+tc.name, func(t *testing.T) {
				t.Parallel()
				r := query(t, s, network, tc.qname, tc.qtype)
				if r.Rcode != tc.wantRcode {
					t.Errorf("rcode = %s, want %s", dns.RcodeToString[r.Rcode], dns.RcodeToString[tc.wantRcode])
				}
				if !r.Authoritative {
					t.Errorf("AA bit not set")
				}
				if diff := cmp.Diff(tc.wantAns, rrStrings(r.Answer)); diff != "" {
					t.Errorf("answer mismatch (-want +got):\n%s", diff)
				}
				if diff := cmp.Diff(tc.wantExtra, rrStrings(r.Extra)); diff != "" {
					t.Errorf("additional mismatch (-want +got):\n%s", diff)
				}
				if len(r.Ns) != 0 {
					t.Errorf("authority = %v, want none without a zone", r.Ns)
				}
			})
		}
	}
}

func TestDNSServerTTL(t *testing.T) {
	t.Parallel()
	s := startDNS(t, DNSConfig{DefaultTTL: 7})
	s.SetA("a.example", "10.0.0.1")
	s.SetA("b.example", "10.0.0.2")
	s.SetTTL("B.example.", 1)

	tests := []struct {
		name string
		want uint32
	}{
		{name: "a.example", want: 7},
		{name: "b.example", want: 1},
	}
	for _, tc := range tests {
		r := query(t, s, "udp", tc.name, dns.TypeA)
		if len(r.Answer) != 1 {
			t.Fatalf("%s: answer = %v, want one record", tc.name, r.Answer)
		}
		if got := r.Answer[0].Header().Ttl; got != tc.want {
			t.Errorf("%s: TTL = %d, want %d", tc.name, got, tc.want)
		}
	}

	// Default of the default.
	d := startDNS(t, DNSConfig{})
	d.SetA("a.example", "10.0.0.1")
	if got := query(t, d, "udp", "a.example", dns.TypeA).Answer[0].Header().Ttl; got != DefaultDNSTTL {
		t.Errorf("default TTL = %d, want %d", got, DefaultDNSTTL)
	}
}

func TestDNSServerZone(t *testing.T) {
	t.Parallel()
	s := startDNS(t, DNSConfig{Zone: "Cluster.Local", DefaultTTL: 3})
	s.SetA("web.default.svc.cluster.local", "10.0.0.1")

	r := query(t, s, "udp", "web.default.svc.cluster.local", dns.TypeA)
	if got := rrStrings(r.Answer); !slices.Equal(got, []string{"A web.default.svc.cluster.local. 10.0.0.1"}) {
		t.Errorf("answer = %v", got)
	}
	r = query(t, s, "udp", "gone.default.svc.cluster.local", dns.TypeA)
	if r.Rcode != dns.RcodeNameError {
		t.Errorf("rcode = %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
	}
	if len(r.Ns) != 1 {
		t.Fatalf("authority = %v, want the zone's SOA", r.Ns)
	}
	soa, ok := r.Ns[0].(*dns.SOA)
	if !ok || soa.Hdr.Name != "cluster.local." || soa.Minttl != 3 {
		t.Errorf("authority = %v, want SOA cluster.local. with minimum 3", r.Ns[0])
	}
	r = query(t, s, "udp", "web.default.svc.cluster.local", dns.TypeAAAA)
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 || len(r.Ns) != 1 {
		t.Errorf("NODATA: rcode=%s answer=%v ns=%v, want NOERROR, no answer, SOA", dns.RcodeToString[r.Rcode], r.Answer, r.Ns)
	}
	r = query(t, s, "udp", "example.com", dns.TypeA)
	if r.Rcode != dns.RcodeRefused {
		t.Errorf("outside zone: rcode = %s, want REFUSED", dns.RcodeToString[r.Rcode])
	}
}

func TestDNSServerChanges(t *testing.T) {
	t.Parallel()
	s := startDNS(t, DNSConfig{})
	s.SetA("svc.example", "10.0.0.1")
	steps := []struct {
		name      string
		change    func()
		wantRcode int
		wantAns   []string
	}{
		{name: "initial", change: func() {}, wantAns: []string{"A svc.example. 10.0.0.1"}},
		{
			name:    "scale out",
			change:  func() { s.SetA("svc.example", "10.0.0.1", "10.0.0.2") },
			wantAns: []string{"A svc.example. 10.0.0.1", "A svc.example. 10.0.0.2"},
		},
		{name: "scale to zero", change: func() { s.SetA("svc.example") }},
		{name: "removed", change: func() { s.Remove("SVC.example.") }, wantRcode: dns.RcodeNameError},
		{
			name:      "servfail",
			change:    func() { s.SetA("svc.example", "10.0.0.3"); s.SetFailure(dns.RcodeServerFailure) },
			wantRcode: dns.RcodeServerFailure,
		},
		{name: "refused", change: func() { s.SetFailure(dns.RcodeRefused) }, wantRcode: dns.RcodeRefused},
		{name: "recovered", change: func() { s.SetFailure(0) }, wantAns: []string{"A svc.example. 10.0.0.3"}},
	}
	for _, st := range steps {
		st.change()
		for _, network := range []string{"udp", "tcp"} {
			r := query(t, s, network, "svc.example", dns.TypeA)
			if r.Rcode != st.wantRcode {
				t.Errorf("%s over %s: rcode = %s, want %s", st.name, network, dns.RcodeToString[r.Rcode], dns.RcodeToString[st.wantRcode])
			}
			if diff := cmp.Diff(st.wantAns, rrStrings(r.Answer)); diff != "" {
				t.Errorf("%s over %s: answer mismatch (-want +got):\n%s", st.name, network, diff)
			}
		}
	}
}

func TestDNSServerDown(t *testing.T) {
	t.Parallel()
	s := startDNS(t, DNSConfig{})
	s.SetA("svc.example", "10.0.0.1")
	s.SetDown(true)
	before := s.Queries()
	for _, network := range []string{"udp", "tcp"} {
		m := new(dns.Msg)
		m.SetQuestion("svc.example.", dns.TypeA)
		c := &dns.Client{Net: network, Timeout: 200 * time.Millisecond}
		if r, _, err := c.Exchange(m, s.Addr()); err == nil {
			t.Errorf("query over %s while down = %v, want a timeout", network, r)
		} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
			t.Errorf("query over %s while down: error = %v, want a timeout", network, err)
		}
	}
	if got := s.Queries() - before; got != 2 {
		t.Errorf("Queries() grew by %d while down, want 2", got)
	}
	s.SetDown(false)
	if r := query(t, s, "udp", "svc.example", dns.TypeA); len(r.Answer) != 1 {
		t.Errorf("after SetDown(false): answer = %v, want one record", r.Answer)
	}
}

func TestDNSServerTruncation(t *testing.T) {
	t.Parallel()
	s := startDNS(t, DNSConfig{})
	var ips []string
	for i := range 100 {
		ips = append(ips, "10.0.1."+strconv.Itoa(i+1))
	}
	s.SetA("big.example", ips...)

	r := query(t, s, "udp", "big.example", dns.TypeA)
	if !r.Truncated {
		t.Errorf("UDP answer with 100 records: TC not set (%d records)", len(r.Answer))
	}
	r = query(t, s, "tcp", "big.example", dns.TypeA)
	if r.Truncated || len(r.Answer) != 100 {
		t.Errorf("TCP answer: TC=%v with %d records, want all 100", r.Truncated, len(r.Answer))
	}
	// A large EDNS0 buffer fits them over UDP.
	m := new(dns.Msg)
	m.SetQuestion("big.example.", dns.TypeA)
	m.SetEdns0(4096, false)
	r, _, err := (&dns.Client{Timeout: 5 * time.Second}).Exchange(m, s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	if r.Truncated || len(r.Answer) != 100 {
		t.Errorf("UDP answer with EDNS0 4096: TC=%v with %d records, want all 100", r.Truncated, len(r.Answer))
	}
}

func TestDNSServerLifecycle(t *testing.T) {
	t.Parallel()
	s := NewDNSServer(DNSConfig{Logger: slog.New(slog.DiscardHandler)})
	s.Stop() // before Start: no-op
	if got := s.Addr(); got != "" {
		t.Errorf("Addr() before Start = %q, want empty", got)
	}
	if err := s.Start("127.0.0.1:0"); err == nil {
		t.Error("Start after Stop succeeded, want error")
	}

	s = NewDNSServer(DNSConfig{Logger: slog.New(slog.DiscardHandler)})
	if err := s.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	if err := s.Start("127.0.0.1:0"); err == nil {
		t.Error("second Start succeeded, want error")
	}
	addr := s.Addr()
	s.SetA("x.example", "10.0.0.1")
	if r := query(t, s, "tcp", "x.example", dns.TypeA); len(r.Answer) != 1 {
		t.Errorf("answer = %v", r.Answer)
	}
	s.Stop()
	s.Stop()
	// The port is free again: both listeners were closed.
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Errorf("UDP %s still bound after Stop: %v", addr, err)
	} else {
		pc.Close()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Errorf("TCP %s still bound after Stop: %v", addr, err)
	} else {
		ln.Close()
	}

	// A bad address fails Start.
	bad := NewDNSServer(DNSConfig{Logger: slog.New(slog.DiscardHandler)})
	if err := bad.Start("256.0.0.1:0"); err == nil {
		bad.Stop()
		t.Error("Start on a bad address succeeded")
	}
}

func TestDNSServerSetAPanicsOnBadIP(t *testing.T) {
	t.Parallel()
	defer func() {
		if recover() == nil {
			t.Error("SetA with a bad IP did not panic")
		}
	}()
	NewDNSServer(DNSConfig{}).SetA("x", "not-an-ip")
}

func TestDNSServerQueryCounter(t *testing.T) {
	t.Parallel()
	s := startDNS(t, DNSConfig{})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for range 3 {
		m := new(dns.Msg)
		m.SetQuestion("x.example.", dns.TypeA)
		if _, _, err := new(dns.Client).ExchangeContext(ctx, m, s.Addr()); err != nil {
			t.Fatal(err)
		}
	}
	if got := s.Queries(); got != 3 {
		t.Errorf("Queries() = %d, want 3", got)
	}
}

func TestDNSServerOmitAdditional(t *testing.T) {
	t.Parallel()
	s := startDNS(t, DNSConfig{OmitAdditional: true})
	s.SetA("a.example", "10.0.0.1")
	s.SetSRV("_grpc._tcp.svc.example", SRV{Target: "a.example", Port: 80, Weight: 1})
	r := query(t, s, "udp", "_grpc._tcp.svc.example", dns.TypeSRV)
	if len(r.Answer) != 1 {
		t.Errorf("answer = %v, want one SRV record", r.Answer)
	}
	if got := rrStrings(r.Extra); len(got) != 0 {
		t.Errorf("additional = %v, want none with OmitAdditional", got)
	}
}
