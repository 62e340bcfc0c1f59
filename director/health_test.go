package director

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

const (
	serving       = healthpb.HealthCheckResponse_SERVING
	notServing    = healthpb.HealthCheckResponse_NOT_SERVING
	serviceUnkown = healthpb.HealthCheckResponse_SERVICE_UNKNOWN
)

func TestNewHealthConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		cfg  Config
		want healthConfig
	}{
		{name: "defaults", want: healthConfig{timeout: time.Second, healthyAfter: 1, unhealthyAfter: 2}},
		{
			name: "explicit",
			cfg:  Config{HealthCheckInterval: time.Second, HealthCheckTimeout: 200 * time.Millisecond, HealthCheckService: "svc", HealthyThreshold: 3, UnhealthyThreshold: 4},
			want: healthConfig{interval: time.Second, timeout: 200 * time.Millisecond, service: "svc", healthyAfter: 3, unhealthyAfter: 4},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := newHealthConfig(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(healthConfig{})); diff != "" {
				t.Errorf("newHealthConfig mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestHealthRun(t *testing.T) {
	t.Parallel()
	const (
		P = probePass
		F = probeFail
		N = probeNotServing
	)
	tests := []struct {
		name                         string
		healthyAfter, unhealthyAfter int
		results                      []probeResult
		want                         []bool // verdict after each result
	}{
		{name: "passes stay healthy", healthyAfter: 1, unhealthyAfter: 2, results: []probeResult{P, P}, want: []bool{true, true}},
		{name: "two failures in a row", healthyAfter: 1, unhealthyAfter: 2, results: []probeResult{F, F, F}, want: []bool{true, false, false}},
		{name: "pass resets the run", healthyAfter: 1, unhealthyAfter: 2, results: []probeResult{F, P, F, P}, want: []bool{true, true, true, true}},
		{name: "not serving at once", healthyAfter: 1, unhealthyAfter: 5, results: []probeResult{N}, want: []bool{false}},
		{name: "not serving after a failure", healthyAfter: 1, unhealthyAfter: 5, results: []probeResult{F, N}, want: []bool{true, false}},
		{name: "one pass recovers", healthyAfter: 1, unhealthyAfter: 1, results: []probeResult{F, P}, want: []bool{false, true}},
		{name: "healthy threshold three", healthyAfter: 3, unhealthyAfter: 1, results: []probeResult{N, P, P, F, P, P, P}, want: []bool{false, false, false, false, false, false, true}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := healthRun{healthyAfter: tc.healthyAfter, unhealthyAfter: tc.unhealthyAfter, healthy: true}
			var got []bool
			for _, r := range tc.results {
				was := h.healthy
				if changed := h.observe(r); changed != (was != h.healthy) {
					t.Fatalf("observe(%v) = %v, but the verdict went from %v to %v", r, changed, was, h.healthy)
				}
				got = append(got, h.healthy)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("verdicts mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// setHealthOf flips addr's health as a checker would.
func setHealthOf(t *testing.T, d *Director, addr string, healthy bool) {
	t.Helper()
	d.mu.Lock()
	ctr := d.counters[addr]
	d.mu.Unlock()
	if ctr == nil {
		t.Fatalf("no backend %s", addr)
	}
	st := notServing
	if healthy {
		st = serving
	}
	d.setHealth(addr, ctr, healthy, st, nil)
}

// TestSetHealth checks what a verdict does to picking, without network:
// an unhealthy backend is left out, all unhealthy means panic mode, and
// the transitions are logged.
func TestSetHealth(t *testing.T) {
	t.Parallel()
	logger, records := captureLogs(t, slog.LevelInfo)
	d := newOutlierDirector(t, Config{Logger: logger}, newFakeClock(), "a:1", "b:1", "c:1")
	records()
	info := func(msg string, kv ...any) logRecord {
		r := logRecord{"level": "INFO", "msg": msg, "component": "director"}
		for i := 0; i < len(kv); i += 2 {
			r[kv[i].(string)] = kv[i+1]
		}
		return r
	}
	steps := []struct {
		name      string
		do        func()
		wantPicks map[string]int
		wantLogs  []logRecord
	}{
		{
			name:      "b unhealthy",
			do:        func() { setHealthOf(t, d, "b:1", false) },
			wantPicks: map[string]int{"a:1": 3, "c:1": 3},
			wantLogs:  []logRecord{info("backend unhealthy", "backend", "b:1", "status", "NOT_SERVING")},
		},
		{
			name:      "same verdict again logs nothing",
			do:        func() { setHealthOf(t, d, "b:1", false) },
			wantPicks: map[string]int{"a:1": 3, "c:1": 3},
		},
		{
			name: "all unhealthy: panic mode",
			do: func() {
				setHealthOf(t, d, "a:1", false)
				setHealthOf(t, d, "c:1", false)
			},
			wantPicks: map[string]int{"a:1": 2, "b:1": 2, "c:1": 2},
			wantLogs: []logRecord{
				info("backend unhealthy", "backend", "a:1", "status", "NOT_SERVING"),
				info("backend unhealthy", "backend", "c:1", "status", "NOT_SERVING"),
				{"level": "WARN", "msg": "no healthy backend; picking among all backends", "component": "director", "backends": 3.0, "policy": RoundRobin},
			},
		},
		{
			name:      "one healthy again",
			do:        func() { setHealthOf(t, d, "c:1", true) },
			wantPicks: map[string]int{"c:1": 6},
			wantLogs: []logRecord{
				info("backend healthy", "backend", "c:1"),
				info("healthy backends available again", "policy", RoundRobin),
			},
		},
	}
	for _, step := range steps {
		step.do()
		if diff := cmp.Diff(step.wantPicks, pickCounts(t, d, 6)); diff != "" {
			t.Errorf("%s: picks mismatch (-want +got):\n%s", step.name, diff)
		}
		if diff := cmp.Diff(step.wantLogs, records()); diff != "" {
			t.Errorf("%s: logs mismatch (-want +got):\n%s", step.name, diff)
		}
	}
	var healthy []string
	for _, b := range d.Backends() {
		if b.Healthy {
			healthy = append(healthy, b.Addr)
		}
	}
	if diff := cmp.Diff([]string{"c:1"}, healthy); diff != "" {
		t.Errorf("healthy backends mismatch (-want +got):\n%s", diff)
	}

	// A verdict for a backend that has left (and come back) is dropped.
	d.mu.Lock()
	oldA := d.counters["a:1"]
	d.mu.Unlock()
	mustUpdate(t, d, state("b:1", "c:1"))
	mustUpdate(t, d, state("a:1", "b:1", "c:1"))
	d.setHealth("a:1", oldA, true, serving, nil)
	d.setHealth("a:1", oldA, false, notServing, nil)
	if !statsOf(t, d, "a:1").Healthy {
		t.Error("a stale checker's verdict reached the new a:1")
	}
}

// TestHealthAndEjection checks how the two exclusions combine: ejection
// never takes out the last healthy backend, and a backend that turns
// unhealthy while the only healthy one is ejected brings that one back.
func TestHealthAndEjection(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	d := newOutlierDirector(t, Config{MaxEjectionPercent: 100}, clk, "a:1", "b:1", "c:1")
	setHealthOf(t, d, "b:1", false)
	setHealthOf(t, d, "c:1", false)
	failN(t, d, "a:1", errUnavailable, 3)
	if got := statsOf(t, d, "a:1"); got.Ejected {
		t.Fatal("the last healthy backend was ejected")
	}

	setHealthOf(t, d, "b:1", true)
	failN(t, d, "a:1", errUnavailable, 3)
	if !statsOf(t, d, "a:1").Ejected {
		t.Fatal("a:1 not ejected although b:1 is healthy")
	}
	if diff := cmp.Diff(map[string]int{"b:1": 4}, pickCounts(t, d, 4)); diff != "" {
		t.Errorf("picks mismatch (-want +got):\n%s", diff)
	}
	// b turns unhealthy: the ejected but healthy a:1 comes back early
	// rather than panic mode picking unhealthy backends.
	setHealthOf(t, d, "b:1", false)
	if diff := cmp.Diff(map[string]int{"a:1": 4}, pickCounts(t, d, 4)); diff != "" {
		t.Errorf("picks after b:1 turned unhealthy mismatch (-want +got):\n%s", diff)
	}
}

// TestHealthRecoverySlowStarts checks that a backend that becomes healthy
// again ramps up like a new one.
func TestHealthRecoverySlowStarts(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	d := newSlowStartDirector(t, RoundRobin, nil, clk, state("a:1", "b:1"))
	setHealthOf(t, d, "b:1", false)
	clk.Advance(time.Minute)
	setHealthOf(t, d, "b:1", true)
	if diff := cmp.Diff(map[string]int{"a:1": 100, "b:1": 10}, pickCounts(t, d, 110)); diff != "" {
		t.Errorf("picks after recovery mismatch (-want +got):\n%s", diff)
	}
}

// scriptedProber is a healthProber driven by the test: check announces
// itself on asked, then returns the next reply from the test.
type scriptedProber struct {
	asked   chan<- string
	replies <-chan probeReply
	addr    string
	closed  chan<- string
}

type probeReply struct {
	st  healthpb.HealthCheckResponse_ServingStatus
	err error
}

func (p *scriptedProber) check(ctx context.Context) (healthpb.HealthCheckResponse_ServingStatus, error) {
	select {
	case p.asked <- p.addr:
	case <-ctx.Done():
		return healthpb.HealthCheckResponse_UNKNOWN, ctx.Err()
	}
	select {
	case r := <-p.replies:
		return r.st, r.err
	case <-ctx.Done():
		return healthpb.HealthCheckResponse_UNKNOWN, ctx.Err()
	}
}

func (p *scriptedProber) Close() error {
	p.closed <- p.addr
	return nil
}

// runDirector runs d.Run in a goroutine until the test ends (or stop is
// called), then checks that it returned nil.
func runDirector(t *testing.T, d *Director) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- d.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-errc:
				if err != nil {
					t.Errorf("Run() = %v, want nil", err)
				}
			case <-time.After(10 * time.Second):
				t.Error("Run did not return within 10s of cancel")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// TestCheckerVerdicts drives one checker through a script of replies and
// checks the verdict after each, and the logs.
func TestCheckerVerdicts(t *testing.T) {
	t.Parallel()
	logger, records := captureLogs(t, slog.LevelInfo)
	d := newOutlierDirector(t, Config{Logger: logger, HealthCheckInterval: time.Millisecond}, newFakeClock(), "a:1", "b:1")
	records()
	asked := make(chan string)
	closed := make(chan string, 2)
	replies := map[string]chan probeReply{"a:1": make(chan probeReply), "b:1": make(chan probeReply)}
	d.dialHealth = func(addr string, hc healthConfig) (healthProber, error) {
		return &scriptedProber{asked: asked, replies: replies[addr], addr: addr, closed: closed}, nil
	}
	stop := runDirector(t, d)

	errRefused := status.Error(codes.Unavailable, "connection refused")
	steps := []struct {
		reply       probeReply
		wantHealthy bool
		wantLog     logRecord
		wantWarn    bool // the once-per-checker Unimplemented warning
	}{
		{reply: probeReply{st: serving}, wantHealthy: true},
		{reply: probeReply{err: errRefused}, wantHealthy: true},
		{reply: probeReply{st: serving}, wantHealthy: true},
		{reply: probeReply{err: errRefused}, wantHealthy: true},
		{reply: probeReply{err: errRefused}, wantHealthy: false,
			wantLog: logRecord{"level": "INFO", "msg": "backend unhealthy", "component": "director", "backend": "a:1", "err": "rpc error: code = Unavailable desc = connection refused"}},
		{reply: probeReply{st: notServing}, wantHealthy: false},
		{reply: probeReply{st: serving}, wantHealthy: true,
			wantLog: logRecord{"level": "INFO", "msg": "backend healthy", "component": "director", "backend": "a:1"}},
		{reply: probeReply{st: serviceUnkown}, wantHealthy: false,
			wantLog: logRecord{"level": "INFO", "msg": "backend unhealthy", "component": "director", "backend": "a:1", "status": "SERVICE_UNKNOWN"}},
		{reply: probeReply{err: status.Error(codes.Unimplemented, "unknown service grpc.health.v1.Health")}, wantHealthy: true,
			wantLog:  logRecord{"level": "INFO", "msg": "backend healthy", "component": "director", "backend": "a:1"},
			wantWarn: true},
		{reply: probeReply{err: status.Error(codes.Unimplemented, "unknown service grpc.health.v1.Health")}, wantHealthy: true},
		{reply: probeReply{st: serving}, wantHealthy: true},
	}
	// b:1 always answers SERVING; a:1 follows the script. A checker asks
	// again only after it has acted on the previous reply, so when a:1
	// asks, the previous step's verdict is in place.
	next := 0
	for next <= len(steps) {
		addr := <-asked
		if addr == "b:1" {
			replies["b:1"] <- probeReply{st: serving}
			continue
		}
		if next > 0 {
			s := steps[next-1]
			if got := statsOf(t, d, "a:1").Healthy; got != s.wantHealthy {
				t.Errorf("step %d (%+v): Healthy = %v, want %v", next-1, s.reply, got, s.wantHealthy)
			}
			var want []logRecord
			if s.wantWarn {
				want = append(want, logRecord{"level": "WARN", "msg": "backend does not implement grpc.health.v1; treating it as healthy", "component": "director", "backend": "a:1"})
			}
			if s.wantLog != nil {
				want = append(want, s.wantLog)
			}
			if diff := cmp.Diff(want, records()); diff != "" {
				t.Errorf("step %d (%+v): logs mismatch (-want +got):\n%s", next-1, s.reply, diff)
			}
		}
		if next == len(steps) {
			break
		}
		replies["a:1"] <- steps[next].reply
		next++
	}
	// Leave a:1 asking; stop must cut the pending check short.
	stop()
	var gotClosed []string
	for range 2 {
		gotClosed = append(gotClosed, <-closed)
	}
	slices.Sort(gotClosed)
	if diff := cmp.Diff([]string{"a:1", "b:1"}, gotClosed); diff != "" {
		t.Errorf("closed probers mismatch (-want +got):\n%s", diff)
	}
}

// countingProber is a healthProber that always answers SERVING and
// reports dial and close.
type countingProber struct {
	addr   string
	closed chan<- string
}

func (p *countingProber) check(context.Context) (healthpb.HealthCheckResponse_ServingStatus, error) {
	return serving, nil
}

func (p *countingProber) Close() error {
	p.closed <- p.addr
	return nil
}

// TestRunFollowsSet checks that Run starts a checker for every backend that
// joins, stops it when the backend leaves, and stops all on cancel.
func TestRunFollowsSet(t *testing.T) {
	t.Parallel()
	d := newOutlierDirector(t, Config{HealthCheckInterval: time.Hour}, newFakeClock(), "a:1", "b:1")
	dialed := make(chan string, 16)
	closed := make(chan string, 16)
	d.dialHealth = func(addr string, hc healthConfig) (healthProber, error) {
		if hc.interval != time.Hour {
			t.Errorf("dial got interval %v, want 1h", hc.interval)
		}
		dialed <- addr
		return &countingProber{addr: addr, closed: closed}, nil
	}
	recv := func(ch <-chan string, n int) []string {
		t.Helper()
		var out []string
		for range n {
			select {
			case a := <-ch:
				out = append(out, a)
			case <-time.After(10 * time.Second):
				t.Fatalf("got %v, waited 10s for %d", out, n)
			}
		}
		slices.Sort(out)
		return out
	}
	stop := runDirector(t, d)
	if diff := cmp.Diff([]string{"a:1", "b:1"}, recv(dialed, 2)); diff != "" {
		t.Errorf("dialed at start mismatch (-want +got):\n%s", diff)
	}
	mustUpdate(t, d, state("b:1", "c:1"))
	if diff := cmp.Diff([]string{"c:1"}, recv(dialed, 1)); diff != "" {
		t.Errorf("dialed after update mismatch (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"a:1"}, recv(closed, 1)); diff != "" {
		t.Errorf("closed after update mismatch (-want +got):\n%s", diff)
	}
	// b:1 leaves and comes back with fresh counters: a fresh checker.
	mustUpdate(t, d, state("c:1"))
	mustUpdate(t, d, state("b:1", "c:1"))
	if diff := cmp.Diff([]string{"b:1"}, recv(closed, 1)); diff != "" {
		t.Errorf("closed after b:1 left mismatch (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"b:1"}, recv(dialed, 1)); diff != "" {
		t.Errorf("dialed after b:1 came back mismatch (-want +got):\n%s", diff)
	}
	stop()
	if diff := cmp.Diff([]string{"b:1", "c:1"}, recv(closed, 2)); diff != "" {
		t.Errorf("closed on stop mismatch (-want +got):\n%s", diff)
	}
	select {
	case a := <-dialed:
		t.Errorf("unexpected dial of %s", a)
	default:
	}
}

func TestRunTwiceAndDisabled(t *testing.T) {
	t.Parallel()
	for _, interval := range []time.Duration{0, time.Hour} {
		t.Run(fmt.Sprintf("interval=%v", interval), func(t *testing.T) {
			t.Parallel()
			d := newOutlierDirector(t, Config{HealthCheckInterval: interval}, newFakeClock(), "a:1")
			d.dialHealth = func(addr string, _ healthConfig) (healthProber, error) {
				return &countingProber{addr: addr, closed: make(chan string, 1)}, nil
			}
			stop := runDirector(t, d)
			// Wait until the first Run holds the flag.
			for !d.running.Load() {
				select {
				case <-t.Context().Done():
					return
				case <-time.After(time.Millisecond):
				}
			}
			if err := d.Run(t.Context()); err == nil || err.Error() != "director: Run is already running" {
				t.Errorf("second Run() = %v, want already running", err)
			}
			stop()
		})
	}
}

// startBackends starts n test servers on loopback, stopped at cleanup.
func startBackends(t *testing.T, n int) []*testserver.Server {
	t.Helper()
	var out []*testserver.Server
	for i := range n {
		s, err := testserver.New(testserver.Config{Name: fmt.Sprintf("backend-%d", i), Logger: discardLogger()})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Start("127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Stop)
		out = append(out, s)
	}
	return out
}

func stateOf(servers ...*testserver.Server) resolver.State {
	var s resolver.State
	for _, srv := range servers {
		s.Addresses = append(s.Addresses, resolver.Address{Addr: srv.Addr()})
	}
	return s
}

// waitFor polls cond every few milliseconds until it holds or within has
// passed, and returns how long that took.
func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(t.Context(), within)
	defer cancel()
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("%s: not within %v", what, within)
		case <-tick.C:
		}
	}
	return time.Since(start)
}

func healthyOf(d *Director, addr string) bool {
	for _, b := range d.Backends() {
		if b.Addr == addr {
			return b.Healthy
		}
	}
	return false
}

// e2eInterval is the check interval of the end-to-end tests.
const e2eInterval = 50 * time.Millisecond

func newHealthDirector(t *testing.T, cfg Config) *Director {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = discardLogger()
	}
	cfg.HealthCheckInterval = e2eInterval
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// checkLog records the checks of real grpc.health.v1 probers, so tests can
// count check rounds rather than wall time, which a loaded machine
// stretches.
type checkLog struct {
	mu     sync.Mutex
	checks []checkRecord
}

type checkRecord struct {
	addr string
	end  time.Time
	st   healthpb.HealthCheckResponse_ServingStatus
	err  error
}

// dial is a Director.dialHealth that records the checks.
func (l *checkLog) dial(addr string, hc healthConfig) (healthProber, error) {
	p, err := dialGRPCHealth(addr, hc)
	if err != nil {
		return nil, err
	}
	return &recordingProber{healthProber: p, log: l, addr: addr}, nil
}

// after returns addr's checks that ended after t, in order.
func (l *checkLog) after(addr string, t time.Time) []checkRecord {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []checkRecord
	for _, c := range l.checks {
		if c.addr == addr && c.end.After(t) {
			out = append(out, c)
		}
	}
	return out
}

type recordingProber struct {
	healthProber
	log  *checkLog
	addr string
}

func (r *recordingProber) check(ctx context.Context) (healthpb.HealthCheckResponse_ServingStatus, error) {
	st, err := r.healthProber.check(ctx)
	r.log.mu.Lock()
	r.log.checks = append(r.log.checks, checkRecord{addr: r.addr, end: time.Now(), st: st, err: err})
	r.log.mu.Unlock()
	return st, err
}

// TestHealthCheckNotServing flips a real backend's grpc.health.v1 status
// and checks that it stops getting picks within two check intervals, and
// gets them again once it serves. "Two intervals" is counted in checks, so
// that a slow machine does not fail the test: the check that was in flight
// at the flip may still see the old status, the next one must not.
func TestHealthCheckNotServing(t *testing.T) {
	t.Parallel()
	srv := startBackends(t, 3)
	d := newHealthDirector(t, Config{})
	var log checkLog
	d.dialHealth = log.dial
	mustUpdate(t, d, stateOf(srv...))
	runDirector(t, d)
	victim := srv[1].Addr()
	begin := time.Now()
	waitFor(t, 5*time.Second, "first check passed", func() bool {
		cs := log.after(victim, begin)
		return len(cs) > 0 && cs[0].err == nil && cs[0].st == serving
	})

	for _, step := range []struct {
		serving bool
		want    healthpb.HealthCheckResponse_ServingStatus
		picks   int // of 30
	}{
		{serving: false, want: notServing, picks: 0},
		{serving: true, want: serving, picks: 10},
	} {
		flip := time.Now()
		srv[1].SetServing(step.serving)
		took := waitFor(t, 5*time.Second, fmt.Sprintf("victim healthy=%v", step.serving), func() bool { return healthyOf(d, victim) == step.serving })
		cs := log.after(victim, flip)
		i := slices.IndexFunc(cs, func(c checkRecord) bool { return c.err == nil && c.st == step.want })
		if i < 0 || i > 1 {
			t.Errorf("serving=%v: verdict changed at check %d after the flip (%+v), want the first or second", step.serving, i, cs)
		}
		t.Logf("serving=%v noticed after %v (interval %v)", step.serving, took, e2eInterval)
		if n := pickCounts(t, d, 30)[victim]; n != step.picks {
			t.Errorf("serving=%v: victim got %d of 30 picks, want %d", step.serving, n, step.picks)
		}
	}
}

// TestHealthCheckStoppedBackend stops a real backend: failed checks make
// it unhealthy after UnhealthyThreshold of them, and it is logged.
func TestHealthCheckStoppedBackend(t *testing.T) {
	t.Parallel()
	srv := startBackends(t, 2)
	logger, records := captureLogs(t, slog.LevelInfo)
	var mu sync.Mutex // captureLogs' buffer is not safe for concurrent use
	d := newHealthDirector(t, Config{Logger: slog.New(lockedHandler{mu: &mu, h: logger.Handler()})})
	mustUpdate(t, d, stateOf(srv...))
	runDirector(t, d)
	victim := srv[0].Addr()
	srv[0].Stop()
	waitFor(t, 10*time.Second, "stopped backend unhealthy", func() bool { return !healthyOf(d, victim) })
	if n := pickCounts(t, d, 20)[victim]; n != 0 {
		t.Errorf("stopped backend got %d of 20 picks", n)
	}
	mu.Lock()
	recs := records()
	mu.Unlock()
	found := false
	for _, r := range recs {
		if r["msg"] == "backend unhealthy" && r["backend"] == victim {
			found = r["err"] != nil
		}
	}
	if !found {
		t.Errorf("no \"backend unhealthy\" record with err for %s in %v", victim, recs)
	}
}

// lockedHandler serialises a slog.Handler that is not safe for concurrent
// use.
type lockedHandler struct {
	mu *sync.Mutex
	h  slog.Handler
}

func (l lockedHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return l.h.Enabled(ctx, level)
}

func (l lockedHandler) Handle(ctx context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.h.Handle(ctx, r)
}

func (l lockedHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return lockedHandler{mu: l.mu, h: l.h.WithAttrs(as)}
}

func (l lockedHandler) WithGroup(name string) slog.Handler {
	return lockedHandler{mu: l.mu, h: l.h.WithGroup(name)}
}

// TestHealthCheckServiceName checks the service name: the test service's
// own status works like the server's, and an unknown service makes every
// backend unhealthy, which is panic mode: picks still succeed.
func TestHealthCheckServiceName(t *testing.T) {
	t.Parallel()
	t.Run("known", func(t *testing.T) {
		t.Parallel()
		srv := startBackends(t, 2)
		d := newHealthDirector(t, Config{HealthCheckService: testserver.ServiceName})
		mustUpdate(t, d, stateOf(srv...))
		runDirector(t, d)
		srv[0].SetServing(false)
		waitFor(t, 5*time.Second, "backend unhealthy", func() bool { return !healthyOf(d, srv[0].Addr()) })
	})
	t.Run("unknown", func(t *testing.T) {
		t.Parallel()
		srv := startBackends(t, 2)
		d := newHealthDirector(t, Config{HealthCheckService: "no.such.Service"})
		mustUpdate(t, d, stateOf(srv...))
		runDirector(t, d)
		waitFor(t, 5*time.Second, "all unhealthy", func() bool {
			return !healthyOf(d, srv[0].Addr()) && !healthyOf(d, srv[1].Addr())
		})
		if got := pickCounts(t, d, 10); len(got) != 2 {
			t.Errorf("panic mode picks = %v, want both backends", got)
		}
	})
}

// TestRunExitsCleanly runs real checks, changes the set under them,
// cancels, and checks that nothing is left running: not parallel, so that
// goleak sees only this test's goroutines.
func TestRunExitsCleanly(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	srv := startBackends(t, 3)
	d := newHealthDirector(t, Config{})
	mustUpdate(t, d, stateOf(srv[0], srv[1]))
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- d.Run(ctx) }()

	srv[1].SetServing(false)
	waitFor(t, 5*time.Second, "checks running", func() bool { return !healthyOf(d, srv[1].Addr()) })
	mustUpdate(t, d, stateOf(srv[1], srv[2])) // srv[0]'s checker stops
	srv[2].SetServing(false)
	waitFor(t, 5*time.Second, "new backend checked", func() bool { return !healthyOf(d, srv[2].Addr()) })

	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("Run() = %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return within 10s of cancel")
	}
	for _, b := range d.Backends() {
		if !b.Healthy {
			t.Errorf("%s still unhealthy after Run returned; nothing checks it any more", b.Addr)
		}
	}
	for _, s := range srv {
		s.Stop()
	}
	goleak.VerifyNone(t, ignore)
}

// TestHealthConcurrent runs picks, set updates and health changes (real
// backends flipping their status under real checks, plus verdicts injected
// as a checker would) at once;
// run it with -race. Bounded loops, no sleeps.
func TestHealthConcurrent(t *testing.T) {
	t.Parallel()
	srv := startBackends(t, 3)
	for _, policy := range Policies() {
		t.Run(policy, func(t *testing.T) {
			t.Parallel()
			d, err := New(Config{Policy: policy, HashHeader: testHashHeader, Logger: discardLogger(),
				HealthCheckInterval: 5 * time.Millisecond, SlowStart: 20 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			sets := []resolver.State{stateOf(srv...), stateOf(srv[0], srv[1]), stateOf(srv[2]), stateOf(srv[1], srv[2])}
			mustUpdate(t, d, sets[0])
			stop := runDirector(t, d)
			var wg sync.WaitGroup
			wg.Go(func() {
				for i := range 100 {
					if err := d.UpdateState(sets[i%len(sets)]); err != nil {
						t.Errorf("UpdateState() error = %v", err)
						return
					}
				}
				if err := d.UpdateState(sets[0]); err != nil {
					t.Errorf("UpdateState() error = %v", err)
				}
			})
			wg.Go(func() {
				for i := range 12 {
					srv[i%len(srv)].SetServing(i%2 == 1)
				}
			})
			wg.Go(func() {
				for i := range 200 {
					addr := srv[i%len(srv)].Addr()
					d.mu.Lock()
					ctr := d.counters[addr]
					d.mu.Unlock()
					if ctr != nil {
						d.setHealth(addr, ctr, i%3 == 0, notServing, errors.New("injected"))
					}
					d.Backends()
				}
			})
			for w := range 6 {
				wg.Go(func() {
					for i := range 300 {
						ctx := keyCtx(fmt.Sprintf("user-%d", i%17))
						_, done, err := d.Pick(ctx, "/s/m")
						if err != nil {
							t.Errorf("Pick() error = %v", err)
							return
						}
						if (i+w)%5 == 0 {
							done(errUnavailable)
						} else {
							done(nil)
						}
					}
				})
			}
			wg.Wait()
			stop()
			for _, b := range d.Backends() {
				if b.InFlight != 0 {
					t.Errorf("backend %s has %d in flight after all done calls", b.Addr, b.InFlight)
				}
			}
		})
	}
}
