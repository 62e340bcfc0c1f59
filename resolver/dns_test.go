package resolver

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// dnsHarness runs a DNS resolver on a fake lookuper and a fake clock.
type dnsHarness struct {
	t     *testing.T
	d     *DNS
	look  *fakeLookuper
	clock *fakeClock
	u     *recUpdater
	logs  *syncBuffer
}

// startFakeDNS starts Run for target with a fake clock, a fixed Rand of 0.5
// (no jitter) unless opts has one, and answers as the lookuper's table.
func startFakeDNS(t *testing.T, target string, opts DNSOptions, answers ...fakeAnswer) *dnsHarness {
	t.Helper()
	h := &dnsHarness{t: t, look: newFakeLookuper(t, answers...), clock: newFakeClock(), u: newRecUpdater()}
	opts.Now, opts.After = h.clock.Now, h.clock.After
	if opts.Rand == nil {
		opts.Rand = fixedRand(0.5)
	}
	opts.Logger, h.logs = logCapture()
	opts, err := opts.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	h.d = newDNS(mustTarget(t, target), opts, h.look)
	runResolver(t, h.d, h.u)
	return h
}

// nextTimer waits for Run's next After call.
func (h *dnsHarness) nextTimer() fakeTimer {
	h.t.Helper()
	select {
	case tm := <-h.clock.timers:
		return tm
	case <-time.After(testTimeout):
		h.t.Fatalf("timed out waiting for Run to wait; lookups so far: %d", h.look.count())
		panic("unreachable")
	}
}

// nextLookup waits for the next lookup and returns the name asked.
func (h *dnsHarness) nextLookup() string {
	h.t.Helper()
	select {
	case host := <-h.look.calls:
		return host
	case <-time.After(testTimeout):
		h.t.Fatal("timed out waiting for a lookup")
		panic("unreachable")
	}
}

var (
	errTimeout  = errors.New("i/o timeout")
	errServfail = errors.New("server answered SERVFAIL")
)

func TestDNSRefreshLogic(t *testing.T) {
	t.Parallel()
	type step struct {
		answer   fakeAnswer
		push     bool     // whether this lookup pushes a set
		want     []string // the pushed set, when push
		wantErr  bool     // whether this lookup calls ReportError
		wantWait time.Duration
	}
	srv := func(target string, port, prio, weight uint16, ips ...string) srvRecord {
		r := srvRecord{target: target, port: port, priority: prio, weight: weight}
		for _, ip := range ips {
			r.addrs = append(r.addrs, netip.MustParseAddr(ip))
		}
		return r
	}
	tests := []struct {
		name   string
		target string
		opts   DNSOptions
		steps  []step
	}{
		{
			name:   "pushes only changes",
			target: "dns:///svc:80",
			steps: []step{
				{answer: fakeAnswer{ips: []string{"10.0.0.2", "10.0.0.1"}}, push: true, want: []string{"10.0.0.1:80", "10.0.0.2:80"}, wantWait: DefaultRefresh},
				{answer: fakeAnswer{ips: []string{"10.0.0.1", "10.0.0.2"}}, wantWait: DefaultRefresh},
				{answer: fakeAnswer{ips: []string{"10.0.0.2", "10.0.0.1", "10.0.0.1"}}, wantWait: DefaultRefresh},
				{answer: fakeAnswer{ips: []string{"10.0.0.3", "10.0.0.1", "10.0.0.2"}}, push: true, want: []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}, wantWait: DefaultRefresh},
				{answer: fakeAnswer{ips: []string{"10.0.0.3"}}, push: true, want: []string{"10.0.0.3:80"}, wantWait: DefaultRefresh},
			},
		},
		{
			name:   "ipv6 addresses bracketed",
			target: "dns:///svc:443",
			opts:   DNSOptions{Refresh: time.Minute},
			steps: []step{
				{answer: fakeAnswer{ips: []string{"2001:db8::1", "10.0.0.1"}}, push: true, want: []string{"10.0.0.1:443", "[2001:db8::1]:443"}, wantWait: time.Minute},
			},
		},
		{
			name:   "error keeps last set with capped backoff",
			target: "dns:///svc:80",
			opts:   DNSOptions{BackoffInitial: time.Second, BackoffMax: 5 * time.Second},
			steps: []step{
				{answer: fakeAnswer{ips: []string{"10.0.0.1"}}, push: true, want: []string{"10.0.0.1:80"}, wantWait: DefaultRefresh},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: time.Second},
				{answer: fakeAnswer{err: errServfail}, wantErr: true, wantWait: 2 * time.Second},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: 4 * time.Second},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: 5 * time.Second},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: 5 * time.Second},
				// Recovery with the same set pushes nothing and resets the backoff.
				{answer: fakeAnswer{ips: []string{"10.0.0.1"}}, wantWait: DefaultRefresh},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: time.Second},
				{answer: fakeAnswer{ips: []string{"10.0.0.2"}}, push: true, want: []string{"10.0.0.2:80"}, wantWait: DefaultRefresh},
			},
		},
		{
			name:   "default backoff",
			target: "dns:///svc:80",
			steps: []step{
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: time.Second},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: 2 * time.Second},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: 4 * time.Second},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: 8 * time.Second},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: 16 * time.Second},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: 30 * time.Second},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: 30 * time.Second},
				// The first success pushes, even after failures.
				{answer: fakeAnswer{ips: []string{"10.0.0.1"}}, push: true, want: []string{"10.0.0.1:80"}, wantWait: DefaultRefresh},
			},
		},
		{
			name:   "authoritative empty answer empties the set",
			target: "dns:///svc:80",
			steps: []step{
				{answer: fakeAnswer{ips: []string{"10.0.0.1", "10.0.0.2"}}, push: true, want: []string{"10.0.0.1:80", "10.0.0.2:80"}, wantWait: DefaultRefresh},
				{answer: fakeAnswer{}, push: true, want: []string{}, wantWait: DefaultRefresh}, // NXDOMAIN or NODATA
				{answer: fakeAnswer{}, wantWait: DefaultRefresh},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: DefaultBackoffInitial},
				{answer: fakeAnswer{ips: []string{"10.0.0.3"}}, push: true, want: []string{"10.0.0.3:80"}, wantWait: DefaultRefresh},
			},
		},
		{
			name:   "first answer empty is pushed",
			target: "dns:///svc:80",
			steps: []step{
				{answer: fakeAnswer{}, push: true, want: []string{}, wantWait: DefaultRefresh},
			},
		},
		{
			name:   "TTL respected within bounds",
			target: "dns:///svc:80",
			opts:   DNSOptions{RespectTTL: true, Refresh: time.Hour, MinTTL: 2 * time.Second, MaxTTL: time.Minute},
			steps: []step{
				{answer: fakeAnswer{ips: []string{"10.0.0.1"}, ttl: 30 * time.Second}, push: true, want: []string{"10.0.0.1:80"}, wantWait: 30 * time.Second},
				{answer: fakeAnswer{ips: []string{"10.0.0.1"}, ttl: 0}, wantWait: 2 * time.Second},
				{answer: fakeAnswer{ips: []string{"10.0.0.1"}, ttl: time.Second}, wantWait: 2 * time.Second},
				{answer: fakeAnswer{ips: []string{"10.0.0.1"}, ttl: 24 * time.Hour}, wantWait: time.Minute},
				{answer: fakeAnswer{ips: []string{"10.0.0.1"}, ttl: noTTL}, wantWait: time.Hour},
				{answer: fakeAnswer{ttl: 7 * time.Second}, push: true, want: []string{}, wantWait: 7 * time.Second},
				{answer: fakeAnswer{err: errTimeout}, wantErr: true, wantWait: DefaultBackoffInitial},
			},
		},
		{
			name:   "TTL default bounds",
			target: "dns:///svc:80",
			opts:   DNSOptions{RespectTTL: true},
			steps: []step{
				{answer: fakeAnswer{ips: []string{"10.0.0.1"}, ttl: 0}, push: true, want: []string{"10.0.0.1:80"}, wantWait: DefaultMinTTL},
				{answer: fakeAnswer{ips: []string{"10.0.0.1"}, ttl: time.Hour}, wantWait: DefaultMaxTTL},
			},
		},
		{
			name:   "TTL ignored by default",
			target: "dns:///svc:80",
			steps: []step{
				{answer: fakeAnswer{ips: []string{"10.0.0.1"}, ttl: 30 * time.Second}, push: true, want: []string{"10.0.0.1:80"}, wantWait: DefaultRefresh},
				{answer: fakeAnswer{ips: []string{"10.0.0.1"}, ttl: 0}, wantWait: DefaultRefresh},
			},
		},
		{
			name:   "SRV lowest priority with weights",
			target: "dns+srv:///_grpc._tcp.svc",
			steps: []step{
				{
					answer: fakeAnswer{srv: []srvRecord{
						srv("a.svc.", 8080, 10, 5, "10.0.0.1"),
						srv("b.svc.", 8081, 10, 0, "10.0.0.2", "2001:db8::2"),
						srv("backup.svc.", 9090, 20, 100, "10.0.0.9"),
					}},
					push:     true,
					want:     []string{"10.0.0.1:8080;weight=5", "10.0.0.2:8081;weight=1", "[2001:db8::2]:8081;weight=1"},
					wantWait: DefaultRefresh,
				},
				{
					// A weight change is a change.
					answer: fakeAnswer{srv: []srvRecord{
						srv("a.svc.", 8080, 10, 7, "10.0.0.1"),
						srv("b.svc.", 8081, 10, 0, "10.0.0.2", "2001:db8::2"),
					}},
					push:     true,
					want:     []string{"10.0.0.1:8080;weight=7", "10.0.0.2:8081;weight=1", "[2001:db8::2]:8081;weight=1"},
					wantWait: DefaultRefresh,
				},
				{
					// The primaries are gone: the backups become the set.
					answer:   fakeAnswer{srv: []srvRecord{srv("backup.svc.", 9090, 20, 100, "10.0.0.9")}},
					push:     true,
					want:     []string{"10.0.0.9:9090;weight=100"},
					wantWait: DefaultRefresh,
				},
				{
					// A target without addresses contributes nothing.
					answer:   fakeAnswer{srv: []srvRecord{srv("gone.svc.", 1, 0, 1), srv("backup.svc.", 9090, 0, 100, "10.0.0.9")}},
					wantWait: DefaultRefresh,
				},
				{
					// Primaries whose targets all vanished give way to
					// the backups.
					answer:   fakeAnswer{srv: []srvRecord{srv("gone.svc.", 1, 0, 1), srv("backup2.svc.", 9091, 5, 2, "10.0.0.8")}},
					push:     true,
					want:     []string{"10.0.0.8:9091;weight=2"},
					wantWait: DefaultRefresh,
				},
				{answer: fakeAnswer{srv: []srvRecord{srv("gone.svc.", 1, 0, 1)}}, push: true, want: []string{}, wantWait: DefaultRefresh},
				{answer: fakeAnswer{}, wantWait: DefaultRefresh},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var answers []fakeAnswer
			for _, st := range tc.steps {
				answers = append(answers, st.answer)
			}
			h := startFakeDNS(t, tc.target, tc.opts, answers...)
			var prevStates, prevErrs int
			for i, st := range tc.steps {
				tm := h.nextTimer() // Run has handled lookup i and waits
				if tm.d != st.wantWait {
					t.Errorf("step %d: wait = %v, want %v", i, tm.d, st.wantWait)
				}
				states, errs := h.u.snapshot()
				wantStates := prevStates
				if st.push {
					wantStates++
				}
				if len(states) != wantStates {
					t.Fatalf("step %d: %d pushes so far, want %d; states = %v", i, len(states), wantStates, states)
				}
				if st.push {
					if diff := cmp.Diff(st.want, addrStrings(states[len(states)-1].Addresses)); diff != "" {
						t.Errorf("step %d: pushed set mismatch (-want +got):\n%s", i, diff)
					}
				}
				wantErrs := prevErrs
				if st.wantErr {
					wantErrs++
				}
				if len(errs) != wantErrs {
					t.Fatalf("step %d: %d ReportError calls so far, want %d", i, len(errs), wantErrs)
				}
				if st.wantErr {
					got := errs[len(errs)-1]
					if !errors.Is(got, st.answer.err) || !strings.HasPrefix(got.Error(), "resolver: "+tc.target) {
						t.Errorf("step %d: ReportError(%v), want a wrapped %v with the target", i, got, st.answer.err)
					}
				}
				prevStates, prevErrs = len(states), len(errs)
				if i < len(tc.steps)-1 {
					h.clock.fire(tm)
				}
			}
			if got, want := h.look.count(), len(tc.steps); got != want {
				t.Errorf("%d lookups, want %d", got, want)
			}
		})
	}
}

func TestDNSIPLiteralNeedsNoLookup(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		target string
		want   []string
	}{
		{name: "ipv4", target: "dns:///10.0.0.1:80", want: []string{"10.0.0.1:80"}},
		{name: "ipv6", target: "dns://127.0.0.1:53/[::1]:80", want: []string{"[::1]:80"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := startFakeDNS(t, tc.target, DNSOptions{}) // no answers: any lookup fails the test
			h.nextTimer()
			got, ok := h.u.last()
			if !ok || !slices.Equal(got, tc.want) {
				t.Errorf("set = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestDNSJitter(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		jitter float64
		rand   float64
		want   time.Duration
	}{
		{name: "lowest", jitter: 0.1, rand: 0, want: 9 * time.Second},
		{name: "middle", jitter: 0.1, rand: 0.5, want: 10 * time.Second},
		{name: "high", jitter: 0.1, rand: 0.75, want: 10500 * time.Millisecond},
		{name: "default jitter", jitter: 0, rand: 0, want: 9 * time.Second},
		{name: "disabled", jitter: -1, rand: 0, want: 10 * time.Second},
		{name: "wide", jitter: 0.5, rand: 0, want: 5 * time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := startFakeDNS(t, "dns:///svc:80",
				DNSOptions{Refresh: 10 * time.Second, Jitter: tc.jitter, Rand: fixedRand(tc.rand)},
				fakeAnswer{ips: []string{"10.0.0.1"}})
			if tm := h.nextTimer(); tm.d != tc.want {
				t.Errorf("wait = %v, want %v", tm.d, tc.want)
			}
		})
	}

	// With real randomness every wait stays within the bounds, and the
	// waits differ.
	opts, err := DNSOptions{Refresh: 10 * time.Second, Rand: rand.New(rand.NewPCG(1, 2))}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	d := newDNS(mustTarget(t, "dns:///svc:80"), opts, nil)
	lo, hi := 9*time.Second, 11*time.Second
	seen := map[time.Duration]bool{}
	for range 1000 {
		got := d.jitter(10 * time.Second)
		if got < lo || got >= hi {
			t.Fatalf("jitter(10s) = %v, want within [%v, %v)", got, lo, hi)
		}
		seen[got] = true
	}
	if len(seen) < 100 {
		t.Errorf("jitter(10s) took only %d distinct values in 1000 draws", len(seen))
	}
}

func TestDNSResolveNow(t *testing.T) {
	t.Parallel()
	h := startFakeDNS(t, "dns:///svc:80", DNSOptions{MinResolveNowInterval: time.Second},
		fakeAnswer{ips: []string{"10.0.0.1"}})
	h.nextLookup()
	if tm := h.nextTimer(); tm.d != DefaultRefresh {
		t.Fatalf("first wait = %v, want %v", tm.d, DefaultRefresh)
	}

	// Within the rate limit: the triggers coalesce, and the lookup waits
	// for the rest of the interval.
	h.clock.advance(300 * time.Millisecond)
	h.look.set(fakeAnswer{ips: []string{"10.0.0.1", "10.0.0.2"}})
	h.d.ResolveNow()
	h.d.ResolveNow()
	h.d.ResolveNow()
	tm := h.nextTimer()
	if tm.d != 700*time.Millisecond {
		t.Fatalf("rate-limit wait = %v, want 700ms", tm.d)
	}
	if n := h.look.count(); n != 1 {
		t.Fatalf("%d lookups before the rate-limit wait ended, want 1", n)
	}
	h.clock.fire(tm)
	h.nextLookup()
	if tm := h.nextTimer(); tm.d != DefaultRefresh {
		t.Fatalf("wait after the early lookup = %v, want %v (pending triggers must coalesce)", tm.d, DefaultRefresh)
	}
	if got, _ := h.u.last(); !slices.Equal(got, []string{"10.0.0.1:80", "10.0.0.2:80"}) {
		t.Errorf("set after ResolveNow = %v", got)
	}
	if n := h.look.count(); n != 2 {
		t.Errorf("%d lookups, want 2", n)
	}

	// After the interval: the lookup starts at once.
	h.clock.advance(2 * time.Second)
	h.d.ResolveNow()
	h.nextLookup()
	if tm := h.nextTimer(); tm.d != DefaultRefresh {
		t.Fatalf("wait after an immediate early lookup = %v, want %v", tm.d, DefaultRefresh)
	}

	// While backing off, ResolveNow waits for the backoff.
	h.look.set(fakeAnswer{err: errTimeout})
	h.clock.advance(2 * time.Second)
	h.d.ResolveNow()
	h.nextLookup() // fails
	backoff := h.nextTimer()
	if backoff.d != DefaultBackoffInitial {
		t.Fatalf("backoff = %v, want %v", backoff.d, DefaultBackoffInitial)
	}
	n := h.look.count()
	h.clock.advance(5 * time.Second) // well past the rate limit
	h.d.ResolveNow()
	h.clock.fire(backoff)
	h.nextLookup()
	if tm := h.nextTimer(); tm.d != 2*DefaultBackoffInitial {
		t.Fatalf("wait after the second failure = %v, want %v; ResolveNow must not cut a backoff short", tm.d, 2*DefaultBackoffInitial)
	}
	if got := h.look.count(); got != n+1 {
		t.Errorf("%d lookups after the backoff, want %d", got, n+1)
	}
}

func TestDNSResolveNowBeforeRun(t *testing.T) {
	t.Parallel()
	d, err := NewDNS(mustTarget(t, "dns:///svc:80"), DNSOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Never blocks, whether or not Run is running.
	for range 10 {
		d.ResolveNow()
	}
}

func TestDNSUpdaterRejects(t *testing.T) {
	t.Parallel()
	h := &dnsHarness{t: t, look: newFakeLookuper(t,
		fakeAnswer{ips: []string{"10.0.0.1"}},
		fakeAnswer{ips: []string{"10.0.0.1"}},
		fakeAnswer{ips: []string{"10.0.0.1"}},
	), clock: newFakeClock(), u: newRecUpdater()}
	rejects := 1
	h.u.updateErr = func(State) error {
		if rejects > 0 {
			rejects--
			return errors.New("not now")
		}
		return nil
	}
	logger, logs := logCapture()
	opts, err := DNSOptions{Now: h.clock.Now, After: h.clock.After, Rand: fixedRand(0.5), Logger: logger}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	h.d = newDNS(mustTarget(t, "dns:///svc:80"), opts, h.look)
	runResolver(t, h.d, h.u)

	// The first lookup's set was rejected once Run waits for its refresh;
	// check before the next lookup can run.
	tm := h.nextTimer()
	if states, _ := h.u.snapshot(); len(states) != 0 {
		t.Fatalf("accepted states = %v, want none", states)
	}
	if !strings.Contains(logs.String(), "backend set rejected") {
		t.Errorf("logs lack the rejection:\n%s", logs)
	}
	h.clock.fire(tm)            // offered again, accepted
	h.clock.fire(h.nextTimer()) // same set: not offered again
	h.nextTimer()
	states, _ := h.u.snapshot()
	if len(states) != 1 || !slices.Equal(addrStrings(states[0].Addresses), []string{"10.0.0.1:80"}) {
		t.Errorf("accepted states = %v, want one with 10.0.0.1:80", states)
	}
}

func TestDNSLogs(t *testing.T) {
	t.Parallel()
	h := startFakeDNS(t, "dns:///svc:80", DNSOptions{},
		fakeAnswer{ips: []string{"10.0.0.1", "10.0.0.2"}},
		fakeAnswer{ips: []string{"10.0.0.2", "10.0.0.3"}},
		fakeAnswer{err: errServfail},
		fakeAnswer{},
	)
	wantLogs := []string{
		// Set changes at Debug only: the director logs them, once.
		`level=DEBUG msg="backend set changed" component=resolver target=dns:///svc:80 added="[10.0.0.1:80 10.0.0.2:80]" removed=[] backends=2`,
		`level=DEBUG msg="backend set changed" component=resolver target=dns:///svc:80 added=[10.0.0.3:80] removed=[10.0.0.1:80] backends=2`,
		`level=WARN msg="resolution failed; keeping last set" component=resolver target=dns:///svc:80 err="resolver: dns:///svc:80: server answered SERVFAIL" backends=2 failures=1`,
		`level=INFO msg="resolution recovered" component=resolver target=dns:///svc:80 failures=1`,
		`level=DEBUG msg="backend set changed" component=resolver target=dns:///svc:80 added=[] removed="[10.0.0.2:80 10.0.0.3:80]" backends=0`,
	}
	for range 3 {
		h.clock.fire(h.nextTimer())
	}
	h.nextTimer()
	logs := h.logs.String()
	for _, want := range wantLogs {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %s\ngot:\n%s", want, logs)
		}
	}
}

func TestNewDNSValidation(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		target  Target
		opts    DNSOptions
		wantErr string
	}{
		{name: "static", target: Target{Host: "a", Port: 1}, wantErr: "is static"},
		{name: "unknown scheme", target: Target{Scheme: "http", Host: "a", Port: 1}, wantErr: "unknown scheme"},
		{name: "no port", target: Target{Scheme: SchemeDNS, Host: "a"}, wantErr: "incomplete"},
		{name: "negative refresh", target: Target{Scheme: SchemeDNS, Host: "a", Port: 1}, opts: DNSOptions{Refresh: -1}, wantErr: "negative Refresh"},
		{name: "refresh under the minimum", target: Target{Scheme: SchemeDNS, Host: "a", Port: 1}, opts: DNSOptions{Refresh: time.Nanosecond}, wantErr: "Refresh 1ns under the minimum 1ms"},
		{name: "min TTL under the minimum", target: Target{Scheme: SchemeDNS, Host: "a", Port: 1}, opts: DNSOptions{MinTTL: time.Microsecond}, wantErr: "MinTTL 1µs under the minimum 1ms"},
		{name: "jitter 1", target: Target{Scheme: SchemeDNS, Host: "a", Port: 1}, opts: DNSOptions{Jitter: 1}, wantErr: "Jitter 1 not below 1"},
		{name: "ttl bounds", target: Target{Scheme: SchemeDNS, Host: "a", Port: 1}, opts: DNSOptions{MinTTL: time.Hour}, wantErr: "MinTTL 1h0m0s above MaxTTL"},
		{name: "backoff bounds", target: Target{Scheme: SchemeDNS, Host: "a", Port: 1}, opts: DNSOptions{BackoffInitial: time.Hour}, wantErr: "BackoffInitial 1h0m0s above BackoffMax"},
		{name: "ok", target: Target{Scheme: SchemeDNSSRV, Host: "_grpc._tcp.a"}},
		{name: "ok with server", target: Target{Scheme: SchemeDNS, Authority: "127.0.0.1:53", Host: "a", Port: 1}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d, err := NewDNS(tc.target, tc.opts)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("NewDNS() error = %v", err)
				}
				if d.Target() != tc.target {
					t.Errorf("Target() = %v, want %v", d.Target(), tc.target)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("NewDNS() error = %v, want it to contain %q", err, tc.wantErr)
			}
			if !strings.HasPrefix(err.Error(), "resolver: ") {
				t.Errorf("error %q lacks the package prefix", err)
			}
		})
	}
}

// TestDNSRunCancelDuringLookup checks that Run returns nil, pushing nothing
// more, when ctx is cancelled while a lookup is in flight.
func TestDNSRunCancelDuringLookup(t *testing.T) {
	t.Parallel()
	entered := make(chan struct{})
	l := blockingLookuper{entered: entered}
	opts, err := DNSOptions{Logger: slog.New(slog.DiscardHandler)}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	d := newDNS(mustTarget(t, "dns:///svc:80"), opts, l)
	u := newRecUpdater()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, u) }()
	<-entered
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run() = %v, want nil", err)
		}
	case <-time.After(testTimeout):
		t.Fatal("Run did not return")
	}
	if states, errs := u.snapshot(); len(states)+len(errs) != 0 {
		t.Errorf("Updater calls after cancel: states %v, errs %v", states, errs)
	}
}

// blockingLookuper blocks every lookup until ctx is done.
type blockingLookuper struct{ entered chan<- struct{} }

func (b blockingLookuper) lookupHost(ctx context.Context, _ string) ([]netip.Addr, time.Duration, error) {
	close(b.entered)
	<-ctx.Done()
	return nil, 0, ctx.Err()
}

func (b blockingLookuper) lookupSRV(ctx context.Context, _ string) ([]srvRecord, time.Duration, error) {
	close(b.entered)
	<-ctx.Done()
	return nil, 0, ctx.Err()
}
