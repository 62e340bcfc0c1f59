package resolver

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/miekg/dns"

	"github.com/streamlb/streamlb/testserver"
)

// startDNSServer starts a testserver.DNSServer on loopback, stopped at
// cleanup.
func startDNSServer(t *testing.T, cfg testserver.DNSConfig) *testserver.DNSServer {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := testserver.NewDNSServer(cfg)
	if err := s.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

func ipStrings(ips []netip.Addr) []string {
	out := []string{}
	for _, ip := range ips {
		out = append(out, ip.String())
	}
	slices.Sort(out)
	return out
}

func TestDNSClientLookupHost(t *testing.T) {
	t.Parallel()
	s := startDNSServer(t, testserver.DNSConfig{DefaultTTL: 30})
	s.SetA("pods.svc", "10.0.0.1", "10.0.0.2", "2001:db8::1")
	s.SetA("v4.svc", "10.0.0.3")
	s.SetA("v6.svc", "2001:db8::6")
	s.SetA("short.svc", "10.0.0.4")
	s.SetTTL("short.svc", 2)
	s.SetA("empty.svc")
	var many []string
	for i := range 200 {
		many = append(many, "10.1."+strconv.Itoa(i/250)+"."+strconv.Itoa(i%250+1))
	}
	s.SetA("many.svc", many...)

	zoned := startDNSServer(t, testserver.DNSConfig{Zone: "cluster.local", DefaultTTL: 4})
	zoned.SetA("web.cluster.local", "10.0.0.5")

	c := newDNSClient([]string{s.Addr()}, nil, 5*time.Second)
	cz := newDNSClient([]string{zoned.Addr()}, nil, 5*time.Second)
	tests := []struct {
		name    string
		c       *dnsClient
		host    string
		want    []string
		wantTTL time.Duration
	}{
		{name: "A and AAAA", c: c, host: "pods.svc", want: []string{"10.0.0.1", "10.0.0.2", "2001:db8::1"}, wantTTL: 30 * time.Second},
		{name: "case and trailing dot", c: c, host: "PODS.svc.", want: []string{"10.0.0.1", "10.0.0.2", "2001:db8::1"}, wantTTL: 30 * time.Second},
		{name: "v4 only", c: c, host: "v4.svc", want: []string{"10.0.0.3"}, wantTTL: 30 * time.Second},
		{name: "v6 only", c: c, host: "v6.svc", want: []string{"2001:db8::6"}, wantTTL: 30 * time.Second},
		{name: "own TTL", c: c, host: "short.svc", want: []string{"10.0.0.4"}, wantTTL: 2 * time.Second},
		{name: "NODATA", c: c, host: "empty.svc", want: []string{}, wantTTL: noTTL},
		{name: "NXDOMAIN", c: c, host: "missing.svc", want: []string{}, wantTTL: noTTL},
		{name: "truncated answer retried over TCP", c: c, host: "many.svc", want: ipStrings(mustAddrs(many)), wantTTL: 30 * time.Second},
		{name: "NXDOMAIN with SOA", c: cz, host: "gone.cluster.local", want: []string{}, wantTTL: 4 * time.Second},
		{name: "zone answer", c: cz, host: "web.cluster.local", want: []string{"10.0.0.5"}, wantTTL: 4 * time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ips, ttl, err := tc.c.lookupHost(testContext(t), tc.host)
			if err != nil {
				t.Fatalf("lookupHost(%q) error = %v", tc.host, err)
			}
			if diff := cmp.Diff(tc.want, ipStrings(ips)); diff != "" {
				t.Errorf("lookupHost(%q) mismatch (-want +got):\n%s", tc.host, diff)
			}
			if ttl != tc.wantTTL {
				t.Errorf("lookupHost(%q) TTL = %v, want %v", tc.host, ttl, tc.wantTTL)
			}
		})
	}
}

func mustAddrs(ss []string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func TestDNSClientFailures(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		setup   func(s *testserver.DNSServer)
		wantErr string
		timeout bool
	}{
		{name: "SERVFAIL", setup: func(s *testserver.DNSServer) { s.SetFailure(dns.RcodeServerFailure) }, wantErr: "answered SERVFAIL"},
		{name: "REFUSED", setup: func(s *testserver.DNSServer) { s.SetFailure(dns.RcodeRefused) }, wantErr: "answered REFUSED"},
		{name: "down", setup: func(s *testserver.DNSServer) { s.SetDown(true) }, timeout: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := startDNSServer(t, testserver.DNSConfig{})
			s.SetA("svc", "10.0.0.1")
			tc.setup(s)
			c := newDNSClient([]string{s.Addr()}, nil, 100*time.Millisecond)
			before := s.Queries()
			_, _, err := c.lookupHost(testContext(t), "svc")
			if err == nil {
				t.Fatal("lookupHost succeeded, want an error")
			}
			if tc.timeout {
				var ne net.Error
				if !errors.Is(err, context.DeadlineExceeded) && !(errors.As(err, &ne) && ne.Timeout()) {
					t.Errorf("error = %v, want a timeout", err)
				}
			} else if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error = %v, want it to contain %q", err, tc.wantErr)
			}
			// Two attempts for each of A and AAAA.
			if got := s.Queries() - before; got != 2*defaultAttempts {
				t.Errorf("%d queries, want %d", got, 2*defaultAttempts)
			}
		})
	}
}

// TestDNSClientAAAAFailure checks that a failing AAAA query is ignored when
// A has addresses, and fatal when A has none.
func TestDNSClientAAAAFailure(t *testing.T) {
	t.Parallel()
	// A server that answers A normally and fails AAAA.
	good := startDNSServer(t, testserver.DNSConfig{})
	good.SetA("svc", "10.0.0.1")
	good.SetA("v6", "2001:db8::1")
	mux := dns.NewServeMux()
	mux.HandleFunc(".", func(w dns.ResponseWriter, r *dns.Msg) {
		if r.Question[0].Qtype == dns.TypeAAAA {
			m := new(dns.Msg)
			m.SetRcode(r, dns.RcodeServerFailure)
			w.WriteMsg(m)
			return
		}
		resp, err := dns.Exchange(r, good.Addr())
		if err != nil {
			return
		}
		w.WriteMsg(resp)
	})
	addr := serveDNSHandler(t, mux)

	c := newDNSClient([]string{addr}, nil, time.Second)
	ips, _, err := c.lookupHost(testContext(t), "svc")
	if err != nil || !slices.Equal(ipStrings(ips), []string{"10.0.0.1"}) {
		t.Errorf("lookupHost(svc) = %v, %v; want [10.0.0.1] despite the AAAA failure", ips, err)
	}
	if _, _, err := c.lookupHost(testContext(t), "v6"); err == nil || !strings.Contains(err.Error(), "AAAA") {
		t.Errorf("lookupHost(v6) error = %v, want the AAAA failure", err)
	}
}

// serveDNSHandler serves h over UDP on loopback until cleanup.
func serveDNSHandler(t *testing.T, h dns.Handler) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	srv := &dns.Server{PacketConn: pc, Handler: h, NotifyStartedFunc: func() { close(started) }}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ActivateAndServe()
	}()
	<-started
	t.Cleanup(func() {
		srv.Shutdown()
		<-done
	})
	return pc.LocalAddr().String()
}

func TestDNSClientServerFallback(t *testing.T) {
	t.Parallel()
	bad := startDNSServer(t, testserver.DNSConfig{})
	bad.SetFailure(dns.RcodeServerFailure)
	good := startDNSServer(t, testserver.DNSConfig{})
	good.SetA("svc", "10.0.0.1")
	c := newDNSClient([]string{bad.Addr(), good.Addr()}, nil, time.Second)
	ips, _, err := c.lookupHost(testContext(t), "svc")
	if err != nil || !slices.Equal(ipStrings(ips), []string{"10.0.0.1"}) {
		t.Errorf("lookupHost = %v, %v; want the second server's answer", ips, err)
	}
}

func TestDNSClientCancel(t *testing.T) {
	t.Parallel()
	s := startDNSServer(t, testserver.DNSConfig{})
	s.SetDown(true)
	c := newDNSClient([]string{s.Addr()}, nil, time.Hour)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		_, _, err := c.lookupHost(ctx, "svc")
		done <- err
	}()
	// Wait until both queries reached the server, then cancel: the
	// hour-long query timeout must not delay the return.
	deadline := time.NewTimer(testTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for s.Queries() < 2 {
		select {
		case <-deadline.C:
			t.Fatal("queries never reached the server")
		case <-tick.C:
		}
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("error = %v, want context.Canceled", err)
		}
	case <-deadline.C:
		t.Fatal("lookupHost did not return after cancel")
	}
}

func TestDNSClientLookupSRV(t *testing.T) {
	t.Parallel()
	setup := func(s *testserver.DNSServer) {
		s.SetA("a.svc", "10.0.0.1")
		s.SetA("b.svc", "10.0.0.2", "2001:db8::2")
		s.SetTTL("b.svc", 3)
		s.SetA("backup.svc", "10.0.0.9")
		s.SetSRV("_grpc._tcp.svc",
			testserver.SRV{Target: "a.svc", Port: 8080, Priority: 1, Weight: 10},
			testserver.SRV{Target: "b.svc", Port: 8081, Priority: 1, Weight: 0},
			testserver.SRV{Target: "gone.svc", Port: 8082, Priority: 1, Weight: 5},
			testserver.SRV{Target: "backup.svc", Port: 9090, Priority: 2, Weight: 1},
		)
		s.SetSRV("_grpc._tcp.none.svc", testserver.SRV{Target: ".", Port: 1})
		s.SetSRV("_grpc._tcp.failover.svc",
			testserver.SRV{Target: "gone.svc", Port: 8082, Priority: 1},
			testserver.SRV{Target: "backup.svc", Port: 9090, Priority: 2, Weight: 4},
			testserver.SRV{Target: "a.svc", Port: 9091, Priority: 3},
		)
	}
	want := []srvRecord{
		{target: "a.svc.", port: 8080, priority: 1, weight: 10, addrs: mustAddrs([]string{"10.0.0.1"})},
		{target: "b.svc.", port: 8081, priority: 1, weight: 0, addrs: mustAddrs([]string{"10.0.0.2", "2001:db8::2"})},
		{target: "gone.svc.", port: 8082, priority: 1, weight: 5},
	}
	for _, omit := range []bool{false, true} {
		t.Run("omit additional "+strconv.FormatBool(omit), func(t *testing.T) {
			t.Parallel()
			s := startDNSServer(t, testserver.DNSConfig{DefaultTTL: 30, OmitAdditional: omit})
			setup(s)
			c := newDNSClient([]string{s.Addr()}, nil, 5*time.Second)
			before := s.Queries()
			recs, ttl, err := c.lookupSRV(testContext(t), "_grpc._tcp.svc")
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, recs, cmp.AllowUnexported(srvRecord{}), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
				t.Errorf("lookupSRV mismatch (-want +got):\n%s", diff)
			}
			if ttl != 3*time.Second {
				t.Errorf("TTL = %v, want 3s (b.svc's)", ttl)
			}
			// One SRV query, and without the additional section an A and
			// an AAAA query per primary target; "gone" is asked too.
			wantQueries := int64(1)
			if omit {
				wantQueries += 2 * 3
			} else {
				wantQueries += 2 // gone.svc is not in the additional section
			}
			if got := s.Queries() - before; got != wantQueries {
				t.Errorf("%d queries, want %d", got, wantQueries)
			}

			recs, _, err = c.lookupSRV(testContext(t), "_grpc._tcp.failover.svc")
			wantFailover := []srvRecord{{target: "backup.svc.", port: 9090, priority: 2, weight: 4, addrs: mustAddrs([]string{"10.0.0.9"})}}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(wantFailover, recs, cmp.AllowUnexported(srvRecord{}), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
				t.Errorf("lookupSRV(failover) mismatch (-want +got):\n%s", diff)
			}

			for _, name := range []string{"_grpc._tcp.none.svc", "_grpc._tcp.missing.svc", "a.svc"} {
				recs, _, err := c.lookupSRV(testContext(t), name)
				if err != nil || len(recs) != 0 {
					t.Errorf("lookupSRV(%q) = %v, %v; want no records and no error", name, recs, err)
				}
			}
		})
	}

	t.Run("failing target lookup fails", func(t *testing.T) {
		t.Parallel()
		s := startDNSServer(t, testserver.DNSConfig{OmitAdditional: true})
		setup(s)
		mux := dns.NewServeMux()
		mux.HandleFunc(".", func(w dns.ResponseWriter, r *dns.Msg) {
			if r.Question[0].Qtype != dns.TypeSRV {
				m := new(dns.Msg)
				m.SetRcode(r, dns.RcodeServerFailure)
				w.WriteMsg(m)
				return
			}
			resp, err := dns.Exchange(r, s.Addr())
			if err == nil {
				w.WriteMsg(resp)
			}
		})
		c := newDNSClient([]string{serveDNSHandler(t, mux)}, nil, time.Second)
		if _, _, err := c.lookupSRV(testContext(t), "_grpc._tcp.svc"); err == nil || !strings.Contains(err.Error(), "SRV target") {
			t.Errorf("lookupSRV error = %v, want a failed target lookup", err)
		}
	})
}

func TestSystemLookuper(t *testing.T) {
	t.Parallel()
	// Zone "." makes every negative answer carry an SOA, as a recursive
	// resolver's would.
	s := startDNSServer(t, testserver.DNSConfig{Zone: ".", DefaultTTL: 9})
	s.SetA("web.default.svc.cluster.local", "10.0.0.1")
	s.SetA("db.svc.cluster.local", "10.0.0.2")
	s.SetA("web.other.svc.cluster.local", "10.0.0.3")
	s.SetA("a.default.svc.cluster.local", "10.0.0.4")
	s.SetSRV("_grpc._tcp.web.default.svc.cluster.local", testserver.SRV{Target: "a.default.svc.cluster.local", Port: 80})
	_, port, _ := net.SplitHostPort(s.Addr())

	dir := t.TempDir()
	conf := filepath.Join(dir, "resolv.conf")
	// Kubernetes writes resolv.conf like this into every pod.
	content := "nameserver 127.0.0.1\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
	if err := os.WriteFile(conf, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	l := newSystemLookuper(conf, time.Second)
	l.port = port

	tests := []struct {
		name    string
		host    string
		want    []string
		wantTTL time.Duration
	}{
		{name: "search first domain", host: "web", want: []string{"10.0.0.1"}, wantTTL: 9 * time.Second},
		{name: "search second domain", host: "db", want: []string{"10.0.0.2"}, wantTTL: 9 * time.Second},
		{name: "partly qualified", host: "web.other", want: []string{"10.0.0.3"}, wantTTL: 9 * time.Second},
		{name: "absolute", host: "web.other.svc.cluster.local.", want: []string{"10.0.0.3"}, wantTTL: 9 * time.Second},
		{name: "nowhere", host: "missing", want: []string{}, wantTTL: 9 * time.Second},
		// /etc/hosts answers first, with no DNS query at all.
		{name: "hosts file", host: "localhost", want: []string{"127.0.0.1"}, wantTTL: noTTL},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ips, ttl, err := l.lookupHost(testContext(t), tc.host)
			if err != nil {
				t.Fatal(err)
			}
			got := ipStrings(ips)
			if tc.host == "localhost" {
				got = slices.DeleteFunc(got, func(s string) bool { return s == "::1" }) // depends on the machine
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("lookupHost(%q) mismatch (-want +got):\n%s", tc.host, diff)
			}
			if ttl != tc.wantTTL {
				t.Errorf("lookupHost(%q) TTL = %v, want %v", tc.host, ttl, tc.wantTTL)
			}
		})
	}

	before := s.Queries()
	if _, _, err := l.lookupHost(testContext(t), "localhost"); err != nil {
		t.Fatal(err)
	}
	if got := s.Queries() - before; got != 0 {
		t.Errorf("localhost cost %d DNS queries, want 0", got)
	}

	recs, _, err := l.lookupSRV(testContext(t), "_grpc._tcp.web")
	if err != nil || len(recs) != 1 || recs[0].port != 80 || !slices.Equal(ipStrings(recs[0].addrs), []string{"10.0.0.4"}) {
		t.Errorf("lookupSRV(_grpc._tcp.web) = %+v, %v", recs, err)
	}
}

// fakeNetResolver stands in for net.DefaultResolver.
type fakeNetResolver struct {
	ips  []netip.Addr
	srvs []*net.SRV
	err  error
}

func (f fakeNetResolver) LookupNetIP(context.Context, string, string) ([]netip.Addr, error) {
	return f.ips, f.err
}

func (f fakeNetResolver) LookupSRV(context.Context, string, string, string) (string, []*net.SRV, error) {
	return "", f.srvs, f.err
}

func TestSystemLookuperFallback(t *testing.T) {
	t.Parallel()
	noServers := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(noServers, []byte("search example.com\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	errBroken := errors.New("broken")
	tests := []struct {
		name     string
		conf     string
		fallback fakeNetResolver
		want     []string
		wantErr  error
	}{
		{name: "addresses", conf: noServers, fallback: fakeNetResolver{ips: mustAddrs([]string{"10.0.0.1", "::ffff:10.0.0.2"})}, want: []string{"10.0.0.1", "10.0.0.2"}},
		{name: "missing file", conf: filepath.Join(t.TempDir(), "nope"), fallback: fakeNetResolver{ips: mustAddrs([]string{"10.0.0.1"})}, want: []string{"10.0.0.1"}},
		{name: "not found is empty", conf: noServers, fallback: fakeNetResolver{err: &net.DNSError{Err: "no such host", IsNotFound: true}}, want: []string{}},
		{name: "failure", conf: noServers, fallback: fakeNetResolver{err: errBroken}, wantErr: errBroken},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l := newSystemLookuper(tc.conf, time.Second)
			l.fallback = tc.fallback
			ips, ttl, err := l.lookupHost(testContext(t), "svc.invalid")
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Errorf("error = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, ipStrings(ips)); diff != "" {
				t.Errorf("mismatch (-want +got):\n%s", diff)
			}
			if ttl != noTTL {
				t.Errorf("TTL = %v, want none", ttl)
			}
		})
	}

	l := newSystemLookuper(noServers, time.Second)
	l.fallback = fakeNetResolver{srvs: []*net.SRV{
		{Target: "localhost.", Port: 80, Priority: 0, Weight: 3},
		{Target: "backup.invalid.", Port: 81, Priority: 1},
	}}
	recs, _, err := l.lookupSRV(testContext(t), "_grpc._tcp.svc.invalid")
	if err != nil || len(recs) != 1 || recs[0].weight != 3 || !slices.Contains(ipStrings(recs[0].addrs), "127.0.0.1") {
		t.Errorf("lookupSRV via fallback = %+v, %v", recs, err)
	}
}
