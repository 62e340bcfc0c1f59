package resolver

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/streamlb/streamlb/testserver"
)

// startWireDNS runs a DNS resolver for target against the real network
// with opts, logging to the returned buffer.
func startWireDNS(t *testing.T, target string, opts DNSOptions) (*DNS, *recUpdater, *syncBuffer) {
	t.Helper()
	logger, logs := logCapture()
	opts.Logger = logger
	d, err := NewDNS(mustTarget(t, target), opts)
	if err != nil {
		t.Fatal(err)
	}
	u := newRecUpdater()
	runResolver(t, d, u)
	return d, u, logs
}

// within returns a context that ends after d, for asserting that a change is
// followed in time.
func within(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// waitLog waits until logs contain want.
func waitLog(ctx context.Context, t *testing.T, logs *syncBuffer, want string) {
	t.Helper()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(logs.String(), want) {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for log %q; logs:\n%s", want, logs)
		case <-tick.C:
		}
	}
}

const fastRefresh = 100 * time.Millisecond

func TestDNSFollowsRecords(t *testing.T) {
	t.Parallel()
	s := startDNSServer(t, testserver.DNSConfig{})
	s.SetA("web.default.svc.cluster.local", "10.0.0.1", "10.0.0.2")
	_, u, logs := startWireDNS(t, "dns://"+s.Addr()+"/web.default.svc.cluster.local:50051", DNSOptions{Refresh: fastRefresh})
	u.waitSet(testContext(t), t, "10.0.0.1:50051", "10.0.0.2:50051")

	steps := []struct {
		name   string
		change func()
		want   []string
	}{
		{name: "scale out", change: func() { s.SetA("web.default.svc.cluster.local", "10.0.0.1", "10.0.0.2", "10.0.0.3") },
			want: []string{"10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"}},
		{name: "pod replaced", change: func() { s.SetA("web.default.svc.cluster.local", "10.0.0.2", "10.0.0.3", "10.0.0.4") },
			want: []string{"10.0.0.2:50051", "10.0.0.3:50051", "10.0.0.4:50051"}},
		{name: "ipv6 pod", change: func() { s.SetA("web.default.svc.cluster.local", "10.0.0.2", "fd00::5") },
			want: []string{"10.0.0.2:50051", "[fd00::5]:50051"}},
		{name: "scale to zero", change: func() { s.SetA("web.default.svc.cluster.local") }, want: []string{}},
		{name: "back", change: func() { s.SetA("web.default.svc.cluster.local", "10.0.0.9") }, want: []string{"10.0.0.9:50051"}},
		{name: "service deleted", change: func() { s.Remove("web.default.svc.cluster.local") }, want: []string{}},
	}
	for _, st := range steps {
		st.change()
		// A change is followed within one refresh (plus jitter) and a
		// second of slack.
		u.waitSet(within(t, fastRefresh+time.Second), t, st.want...)
	}
	out := logs.String()
	for _, want := range []string{
		`msg="backend set changed" component=resolver target=dns://` + s.Addr() + `/web.default.svc.cluster.local:50051 added=[10.0.0.3:50051] removed=[] backends=3`,
		`added=[10.0.0.4:50051] removed=[10.0.0.1:50051]`,
		`removed="[10.0.0.2:50051 [fd00::5]:50051]" backends=0`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("logs lack %s\nlogs:\n%s", want, out)
		}
	}
	// Nothing is pushed that did not change: one push per step plus the
	// first.
	if states, _ := u.snapshot(); len(states) != len(steps)+1 {
		t.Errorf("%d pushes, want %d: %v", len(states), len(steps)+1, states)
	}
}

func TestDNSFailuresKeepSet(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		fail    func(s *testserver.DNSServer)
		recover func(s *testserver.DNSServer)
		wantErr string
	}{
		{
			name:    "SERVFAIL",
			fail:    func(s *testserver.DNSServer) { s.SetFailure(dns.RcodeServerFailure) },
			recover: func(s *testserver.DNSServer) { s.SetFailure(0) },
			wantErr: "answered SERVFAIL",
		},
		{
			name:    "REFUSED",
			fail:    func(s *testserver.DNSServer) { s.SetFailure(dns.RcodeRefused) },
			recover: func(s *testserver.DNSServer) { s.SetFailure(0) },
			wantErr: "answered REFUSED",
		},
		{
			name:    "server down",
			fail:    func(s *testserver.DNSServer) { s.SetDown(true) },
			recover: func(s *testserver.DNSServer) { s.SetDown(false) },
			wantErr: "timeout",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := startDNSServer(t, testserver.DNSConfig{})
			s.SetA("svc.example", "10.0.0.1", "10.0.0.2")
			_, u, logs := startWireDNS(t, "dns://"+s.Addr()+"/svc.example:80", DNSOptions{
				Refresh:        fastRefresh,
				QueryTimeout:   100 * time.Millisecond,
				BackoffInitial: 50 * time.Millisecond,
				BackoffMax:     200 * time.Millisecond,
			})
			ctx := testContext(t)
			u.waitSet(ctx, t, "10.0.0.1:80", "10.0.0.2:80")

			tc.fail(s)
			s.SetA("svc.example") // what the failing server would say if it could
			u.waitFor(ctx, t, "three errors", func() bool {
				_, errs := u.snapshot()
				return len(errs) >= 3
			})
			waitLog(ctx, t, logs, `level=WARN msg="resolution failed; keeping last set" component=resolver target=dns://`+s.Addr()+`/svc.example:80 err=`)
			if !strings.Contains(logs.String(), "backends=2") {
				t.Errorf("Warn log lacks backends=2:\n%s", logs)
			}
			states, errs := u.snapshot()
			if len(states) != 1 {
				t.Errorf("pushes during the failure: %v, want none after the first", states[1:])
			}
			if !strings.Contains(errs[0].Error(), tc.wantErr) {
				t.Errorf("ReportError(%v), want it to contain %q", errs[0], tc.wantErr)
			}

			// After recovery the refresh resumes and follows the records.
			s.SetA("svc.example", "10.0.0.3")
			tc.recover(s)
			u.waitSet(ctx, t, "10.0.0.3:80")
			waitLog(ctx, t, logs, `msg="resolution recovered"`)
		})
	}
}

func TestDNSRespectsTTL(t *testing.T) {
	t.Parallel()
	s := startDNSServer(t, testserver.DNSConfig{})
	s.SetA("svc.example", "10.0.0.1")
	s.SetTTL("svc.example", 1)
	_, u, _ := startWireDNS(t, "dns://"+s.Addr()+"/svc.example:80", DNSOptions{Refresh: time.Hour, RespectTTL: true})
	u.waitSet(testContext(t), t, "10.0.0.1:80")
	start := time.Now()
	s.SetA("svc.example", "10.0.0.2")
	// TTL 1s, jitter ±10%: followed within about 1.1s, not the hour.
	u.waitSet(within(t, 2500*time.Millisecond), t, "10.0.0.2:80")
	t.Logf("followed after %v", time.Since(start))
}

func TestDNSResolveNowOverTheWire(t *testing.T) {
	t.Parallel()
	s := startDNSServer(t, testserver.DNSConfig{})
	s.SetA("svc.example", "10.0.0.1")
	d, u, _ := startWireDNS(t, "dns://"+s.Addr()+"/svc.example:80", DNSOptions{Refresh: time.Hour, MinResolveNowInterval: 10 * time.Millisecond})
	u.waitSet(testContext(t), t, "10.0.0.1:80")
	s.SetA("svc.example", "10.0.0.1", "10.0.0.2")
	d.ResolveNow()
	u.waitSet(within(t, 2*time.Second), t, "10.0.0.1:80", "10.0.0.2:80")
}

func TestDNSSRVOverTheWire(t *testing.T) {
	t.Parallel()
	s := startDNSServer(t, testserver.DNSConfig{})
	s.SetA("pod-a.web.svc", "10.0.0.1")
	s.SetA("pod-b.web.svc", "10.0.0.2")
	s.SetSRV("_grpc._tcp.web.svc",
		testserver.SRV{Target: "pod-a.web.svc", Port: 50051, Weight: 3},
		testserver.SRV{Target: "pod-b.web.svc", Port: 50052, Weight: 0},
	)
	_, u, _ := startWireDNS(t, "dns+srv://"+s.Addr()+"/_grpc._tcp.web.svc", DNSOptions{Refresh: fastRefresh})
	u.waitSet(testContext(t), t, "10.0.0.1:50051;weight=3", "10.0.0.2:50052;weight=1")

	s.SetSRV("_grpc._tcp.web.svc",
		testserver.SRV{Target: "pod-a.web.svc", Port: 50051, Weight: 1},
		testserver.SRV{Target: "pod-b.web.svc", Port: 50052, Weight: 9},
	)
	u.waitSet(within(t, fastRefresh+time.Second), t, "10.0.0.1:50051;weight=1", "10.0.0.2:50052;weight=9")
	states, _ := u.snapshot()
	last := states[len(states)-1].Addresses
	if last[0].Weight != 1 || last[1].Weight != 9 {
		t.Errorf("weights = %v, want 1 and 9", last)
	}
}

func TestDNSSystemResolverHostsFile(t *testing.T) {
	t.Parallel()
	_, u, _ := startWireDNS(t, "dns:///localhost:8080", DNSOptions{})
	u.waitFor(testContext(t), t, "localhost's set", func() bool {
		got, ok := u.last()
		return ok && slices.Contains(got, "127.0.0.1:8080")
	})
}

func TestGroupOverTheWire(t *testing.T) {
	t.Parallel()
	s := startDNSServer(t, testserver.DNSConfig{})
	s.SetA("a.svc", "10.0.0.1", "10.0.0.2")
	s.SetA("b.svc", "10.0.0.2", "10.0.0.3")
	logger, logs := logCapture()
	r, err := New([]string{
		"dns://" + s.Addr() + "/a.svc:80",
		"dns://" + s.Addr() + "/b.svc:80",
		"10.9.9.9:80;weight=2",
	}, DNSOptions{Refresh: fastRefresh, BackoffInitial: 50 * time.Millisecond, BackoffMax: 100 * time.Millisecond, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	u := newRecUpdater()
	runResolver(t, r, u)
	ctx := testContext(t)
	u.waitSet(ctx, t, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.9.9.9:80;weight=2")
	if states, _ := u.snapshot(); len(states) != 1 {
		t.Errorf("startup pushed %d sets, want 1 (the union once all targets reported): %v", len(states), states)
	}

	s.SetA("b.svc", "10.0.0.4")
	u.waitSet(within(t, fastRefresh+time.Second), t, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.4:80", "10.9.9.9:80;weight=2")

	// b.svc's records vanish: only its part of the union goes.
	s.Remove("b.svc")
	u.waitSet(within(t, fastRefresh+time.Second), t, "10.0.0.1:80", "10.0.0.2:80", "10.9.9.9:80;weight=2")

	// The server fails: errors are reported, the union stays.
	s.SetA("b.svc", "10.0.0.5")
	s.SetFailure(dns.RcodeServerFailure)
	_, errsBefore := u.snapshot()
	u.waitFor(ctx, t, "errors from both DNS targets", func() bool {
		_, errs := u.snapshot()
		var a, b bool
		for _, err := range errs[len(errsBefore):] {
			a = a || strings.Contains(err.Error(), "/a.svc:80")
			b = b || strings.Contains(err.Error(), "/b.svc:80")
		}
		return a && b
	})
	if got, _ := u.last(); !slices.Equal(got, []string{"10.0.0.1:80", "10.0.0.2:80", "10.9.9.9:80;weight=2"}) {
		t.Errorf("set during failure = %v, want it kept", got)
	}
	waitLog(ctx, t, logs, "resolution failed; keeping last set")
	s.SetFailure(0)
	u.waitSet(ctx, t, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.5:80", "10.9.9.9:80;weight=2")

	// ResolveNow reaches the DNS children.
	r.(*Group).ResolveNow()
}
