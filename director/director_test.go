package director

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/resolver"
)

// Compile-time check that Director fits the proxy's Picker seam, declared
// here by shape because director must not import proxy.
var _ interface {
	Pick(ctx context.Context, fullMethod string) (addr string, done func(error), err error)
} = (*Director)(nil)

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// newTestDirector returns a round-robin director whose rotation starts at
// the first backend.
func newTestDirector(t *testing.T) *Director {
	t.Helper()
	d, err := New(Config{Policy: RoundRobin, Logger: discardLogger(), Rand: fakeRand(func(int) int { return 0 })})
	if err != nil {
		t.Fatalf("New() error = %v", err)
	}
	return d
}

func state(addrs ...string) resolver.State {
	var s resolver.State
	for _, a := range addrs {
		s.Addresses = append(s.Addresses, resolver.Address{Addr: a})
	}
	return s
}

func mustUpdate(t *testing.T, d *Director, s resolver.State) {
	t.Helper()
	if err := d.UpdateState(s); err != nil {
		t.Fatalf("UpdateState(%+v) error = %v", s, err)
	}
}

// Before picking, and after the returned done, it does what Run's goroutine
// would have done by then (decide handed-over ejections, rebuild a stale
// snapshot), so that tests on a fake clock need not run Run; tests of Run
// itself use Pick.
func mustPick(t *testing.T, d *Director) (string, func(error)) {
	t.Helper()
	d.reconcile()
	addr, done, err := d.Pick(t.Context(), "/test.Service/Method")
	if err != nil {
		t.Fatalf("Pick() error = %v", err)
	}
	if done == nil {
		t.Fatal("Pick() returned a nil done")
	}
	return addr, func(err error) {
		done(err)
		d.reconcile()
	}
}

func TestNew(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{name: "zero config", cfg: Config{}},
		{name: "round robin", cfg: Config{Policy: RoundRobin}},
		{name: "least request default choices", cfg: Config{Policy: LeastRequest}},
		{name: "least request max choices", cfg: Config{Policy: LeastRequest, ChoiceCount: MaxChoiceCount}},
		{name: "round robin ignores choice count", cfg: Config{Policy: RoundRobin, ChoiceCount: 99}},
		{name: "weighted round robin", cfg: Config{Policy: WeightedRoundRobin}},
		{name: "random", cfg: Config{Policy: Random}},
		{name: "peak ewma with options", cfg: Config{Policy: PeakEWMA, ChoiceCount: 3, EWMADecay: time.Second, InitialRTT: time.Millisecond, FailurePenalty: time.Minute}},
		{name: "ring hash", cfg: Config{Policy: RingHash, HashHeader: "X-User", RingSize: 10}},
		{name: "ring hash max ring size", cfg: Config{Policy: RingHash, HashHeader: "x-user", RingSize: MaxRingPoints}},
		{name: "slow start", cfg: Config{SlowStart: time.Minute}},
		{name: "health checks", cfg: Config{HealthCheckInterval: time.Second, HealthCheckTimeout: time.Second, HealthCheckService: "echo.Echo", HealthyThreshold: 3, UnhealthyThreshold: 4}},
		{name: "unknown policy", cfg: Config{Policy: "least_conn"}, wantErr: `director: unknown policy "least_conn" (valid: round_robin, weighted_round_robin, random, least_request, peak_ewma, ring_hash)`},
		{name: "policy is case sensitive", cfg: Config{Policy: "Round_Robin"}, wantErr: "unknown policy"},
		{name: "choice count one", cfg: Config{Policy: LeastRequest, ChoiceCount: 1}, wantErr: "director: least_request choice count 1 out of range 2..10"},
		{name: "choice count too big", cfg: Config{Policy: LeastRequest, ChoiceCount: 11}, wantErr: "out of range"},
		{name: "choice count negative", cfg: Config{Policy: LeastRequest, ChoiceCount: -2}, wantErr: "out of range"},
		{name: "peak ewma choice count", cfg: Config{Policy: PeakEWMA, ChoiceCount: 11}, wantErr: "director: peak_ewma choice count 11 out of range 2..10"},
		{name: "ring hash without header", cfg: Config{Policy: RingHash}, wantErr: "director: ring_hash needs a hash header"},
		{name: "ring size negative", cfg: Config{Policy: RingHash, HashHeader: "x-user", RingSize: -1}, wantErr: "director: ring size -1 out of range 0..1048576"},
		{name: "ring size too big", cfg: Config{Policy: RingHash, HashHeader: "x-user", RingSize: MaxRingPoints + 1}, wantErr: "out of range"},
		{name: "negative decay", cfg: Config{EWMADecay: -time.Second}, wantErr: "director: EWMA decay -1s is negative"},
		{name: "negative initial RTT", cfg: Config{InitialRTT: -time.Second}, wantErr: "director: initial RTT -1s is negative"},
		{name: "negative penalty", cfg: Config{FailurePenalty: -time.Second}, wantErr: "director: failure penalty -1s is negative"},
		{name: "negative slow start", cfg: Config{SlowStart: -time.Second}, wantErr: "director: slow start -1s is negative"},
		{name: "negative interval", cfg: Config{HealthCheckInterval: -time.Second}, wantErr: "director: health check interval -1s is negative"},
		{name: "interval under the minimum", cfg: Config{HealthCheckInterval: time.Nanosecond}, wantErr: "director: health check interval 1ns under the minimum 1ms"},
		{name: "negative timeout", cfg: Config{HealthCheckTimeout: -time.Second}, wantErr: "director: health check timeout -1s is negative"},
		{name: "negative healthy threshold", cfg: Config{HealthyThreshold: -1}, wantErr: "director: healthy threshold -1 is negative"},
		{name: "negative unhealthy threshold", cfg: Config{UnhealthyThreshold: -1}, wantErr: "director: unhealthy threshold -1 is negative"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.cfg.Logger = discardLogger()
			d, err := New(tc.cfg)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("New(%+v) error = %v, want it to contain %q", tc.cfg, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("New(%+v) error = %v", tc.cfg, err)
			}
			if got := d.Backends(); len(got) != 0 {
				t.Errorf("Backends() of a new director = %+v, want none", got)
			}
		})
	}
}

func TestPickNoBackend(t *testing.T) {
	t.Parallel()
	for _, policy := range Policies() {
		t.Run(policy, func(t *testing.T) {
			t.Parallel()
			d, err := New(Config{Policy: policy, HashHeader: testHashHeader, Logger: discardLogger()})
			if err != nil {
				t.Fatal(err)
			}
			check := func(when string) {
				t.Helper()
				addr, done, err := d.Pick(t.Context(), "/s/m")
				if !errors.Is(err, ErrNoBackend) {
					t.Errorf("%s: Pick() error = %v, want ErrNoBackend", when, err)
				}
				if addr != "" || done != nil {
					t.Errorf("%s: Pick() = %q, done=%v; want empty address and nil done", when, addr, done != nil)
				}
			}
			check("before any update")
			mustUpdate(t, d, state("a:1"))
			if _, _, err := d.Pick(t.Context(), "/s/m"); err != nil {
				t.Fatalf("Pick() with one backend: %v", err)
			}
			mustUpdate(t, d, resolver.State{})
			check("after an empty update")
		})
	}
}

func TestUpdateStateKeepsCountersOfSurvivors(t *testing.T) {
	t.Parallel()
	d := newTestDirector(t)
	mustUpdate(t, d, state("b:1", "a:1")) // unsorted on purpose

	errBackend := errors.New("backend failed")
	// Rotation starts at the first address in sorted order.
	for _, want := range []struct {
		addr string
		err  error
	}{{"a:1", nil}, {"b:1", errBackend}, {"a:1", nil}} {
		addr, done := mustPick(t, d)
		if addr != want.addr {
			t.Fatalf("Pick() = %s, want %s", addr, want.addr)
		}
		done(want.err)
	}
	_, pendingB := mustPick(t, d) // b:1 stays in flight across the update
	_, pendingA := mustPick(t, d) // a:1 too

	mustUpdate(t, d, state("c:1", "a:1"))
	want := []BackendStats{
		{Addr: "a:1", Weight: 1, InFlight: 1, Successes: 2, Healthy: true},
		{Addr: "c:1", Weight: 1, Healthy: true},
	}
	if diff := cmp.Diff(want, d.Backends()); diff != "" {
		t.Fatalf("Backends() after replacing b with c (-want +got):\n%s", diff)
	}

	// A done for a removed backend is safe and touches no live counters.
	pendingB(nil)
	pendingA(errBackend)
	want[0] = BackendStats{Addr: "a:1", Weight: 1, Successes: 2, Failures: 1, Healthy: true}
	if diff := cmp.Diff(want, d.Backends()); diff != "" {
		t.Fatalf("Backends() after done calls (-want +got):\n%s", diff)
	}

	// An address that comes back starts with fresh counters.
	mustUpdate(t, d, state("a:1", "b:1", "c:1"))
	want = []BackendStats{want[0], {Addr: "b:1", Weight: 1, Healthy: true}, want[1]}
	if diff := cmp.Diff(want, d.Backends()); diff != "" {
		t.Errorf("Backends() after b returned (-want +got):\n%s", diff)
	}
}

func TestUpdateStateWeights(t *testing.T) {
	t.Parallel()
	d := newTestDirector(t)
	mustUpdate(t, d, resolver.State{Addresses: []resolver.Address{{Addr: "a:1"}, {Addr: "b:1", Weight: 5}}})
	want := []BackendStats{{Addr: "a:1", Weight: 1, Healthy: true}, {Addr: "b:1", Weight: 5, Healthy: true}}
	if diff := cmp.Diff(want, d.Backends()); diff != "" {
		t.Errorf("Backends() mismatch (-want +got):\n%s", diff)
	}
}

func TestUpdateStateRejectsBadState(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		state   resolver.State
		wantErr string
	}{
		{name: "duplicate", state: state("a:1", "b:1", "a:1"), wantErr: `director: duplicate address "a:1"`},
		{name: "empty address", state: state("a:1", ""), wantErr: "director: address 1 of 2 is empty"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := newTestDirector(t)
			mustUpdate(t, d, state("x:1"))
			err := d.UpdateState(tc.state)
			if err == nil || err.Error() != tc.wantErr {
				t.Fatalf("UpdateState() error = %v, want %q", err, tc.wantErr)
			}
			want := []BackendStats{{Addr: "x:1", Weight: 1, Healthy: true}}
			if diff := cmp.Diff(want, d.Backends()); diff != "" {
				t.Errorf("Backends() after a rejected update (-want +got):\n%s", diff)
			}
		})
	}
}

func TestUpdateStateDoesNotRetainState(t *testing.T) {
	t.Parallel()
	d := newTestDirector(t)
	s := state("a:1", "b:1")
	mustUpdate(t, d, s)
	s.Addresses[0].Addr = "mutated:1"
	if got, _ := mustPick(t, d); got != "a:1" {
		t.Errorf("Pick() after caller mutated the state = %s, want a:1", got)
	}
}

func TestDoneIdempotent(t *testing.T) {
	t.Parallel()
	d := newTestDirector(t)
	mustUpdate(t, d, state("a:1"))
	_, done1 := mustPick(t, d)
	_, done2 := mustPick(t, d)
	done1(nil)
	done1(nil)
	done1(errors.New("late"))
	want := []BackendStats{{Addr: "a:1", Weight: 1, InFlight: 1, Successes: 1, Healthy: true}}
	if diff := cmp.Diff(want, d.Backends()); diff != "" {
		t.Errorf("Backends() after repeated done (-want +got):\n%s", diff)
	}

	// Racing calls of the same done count once.
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() { done2(errors.New("boom")) })
	}
	wg.Wait()
	want = []BackendStats{{Addr: "a:1", Weight: 1, Successes: 1, Failures: 1, Healthy: true}}
	if diff := cmp.Diff(want, d.Backends()); diff != "" {
		t.Errorf("Backends() after concurrent done (-want +got):\n%s", diff)
	}
}

// TestConcurrent runs Pick, done, UpdateState, ReportError and Backends at
// once; run it with -race. Bounded loops, no sleeps.
func TestConcurrent(t *testing.T) {
	t.Parallel()
	sets := []resolver.State{
		state("a:1", "b:1", "c:1"),
		state("b:1", "c:1", "d:1"),
		{},
		state("a:1"),
		state("a:1", "b:1", "c:1", "d:1", "e:1"),
	}
	for _, policy := range Policies() {
		t.Run(policy, func(t *testing.T) {
			t.Parallel()
			d, err := New(Config{Policy: policy, HashHeader: testHashHeader, Logger: discardLogger()})
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			wg.Go(func() {
				for i := range 200 {
					if err := d.UpdateState(sets[i%len(sets)]); err != nil {
						t.Errorf("UpdateState() error = %v", err)
						return
					}
					if i%50 == 0 {
						d.ReportError(errors.New("lookup failed"))
					}
				}
				// End on a known set so the final counters can be checked.
				if err := d.UpdateState(sets[0]); err != nil {
					t.Errorf("UpdateState() error = %v", err)
				}
			})
			for w := range 8 {
				wg.Go(func() {
					var pending []func(error)
					for i := range 500 {
						_, done, err := d.Pick(context.Background(), "/s/m")
						if errors.Is(err, ErrNoBackend) {
							continue
						}
						if err != nil {
							t.Errorf("Pick() error = %v", err)
							return
						}
						pending = append(pending, done)
						if i%3 == w%3 {
							d.Backends()
						}
						if len(pending) > 4 {
							pending[0](nil)
							pending[0](nil) // idempotent under concurrency too
							pending = pending[1:]
						}
					}
					for _, done := range pending {
						done(errors.New("stream reset"))
					}
				})
			}
			wg.Wait()
			for _, b := range d.Backends() {
				if b.InFlight != 0 {
					t.Errorf("backend %s has %d in flight after all done calls, want 0", b.Addr, b.InFlight)
				}
			}
		})
	}
}

// logRecord is one decoded JSON log line.
type logRecord map[string]any

// captureLogs returns a logger writing JSON at level and up, and a function
// that returns and clears the records logged so far. The handler writes
// synchronously, so records are complete once the logging call returns.
func captureLogs(t *testing.T, level slog.Level) (*slog.Logger, func() []logRecord) {
	t.Helper()
	var buf bytes.Buffer
	h := slog.NewJSONHandler(&buf, &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	})
	return slog.New(h), func() []logRecord {
		t.Helper()
		var out []logRecord
		for line := range strings.Lines(buf.String()) {
			var r logRecord
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatalf("bad log line %q: %v", line, err)
			}
			out = append(out, r)
		}
		buf.Reset()
		return out
	}
}

// TestLogging walks one director through a sequence of steps and checks the
// records each step logs. Steps depend on the previous ones, so they run in
// order.
func TestLogging(t *testing.T) {
	t.Parallel()
	logger, records := captureLogs(t, slog.LevelInfo)
	d, err := New(Config{Policy: LeastRequest, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	r := func(level, msg string, kv ...any) logRecord {
		rec := logRecord{"level": level, "msg": msg, "component": "director", "policy": LeastRequest}
		for i := 0; i < len(kv); i += 2 {
			rec[kv[i].(string)] = kv[i+1]
		}
		return rec
	}
	addrs := func(as ...resolver.Address) resolver.State { return resolver.State{Addresses: as} }

	steps := []struct {
		name string
		do   func()
		want []logRecord
	}{
		{
			name: "add",
			do: func() {
				mustUpdate(t, d, addrs(resolver.Address{Addr: "a:1"}, resolver.Address{Addr: "b:1", Weight: 2}))
			},
			want: []logRecord{
				r("INFO", "backend added", "backend", "a:1", "weight", 1.0),
				r("INFO", "backend added", "backend", "b:1", "weight", 2.0),
			},
		},
		{
			name: "unchanged set logs nothing",
			do: func() {
				mustUpdate(t, d, addrs(resolver.Address{Addr: "b:1", Weight: 2}, resolver.Address{Addr: "a:1"}))
			},
		},
		{
			name: "picks log nothing at info",
			do: func() {
				_, done := mustPick(t, d)
				done(nil)
			},
		},
		{
			name: "replace and reweight",
			do: func() {
				mustUpdate(t, d, addrs(resolver.Address{Addr: "b:1", Weight: 3}, resolver.Address{Addr: "c:1"}))
			},
			want: []logRecord{
				r("INFO", "backend weight changed", "backend", "b:1", "weight", 3.0, "old_weight", 2.0),
				r("INFO", "backend added", "backend", "c:1", "weight", 1.0),
				r("INFO", "backend removed", "backend", "a:1"),
			},
		},
		{
			// The resolver logs its own failures, with the target; the
			// director would only say it again.
			name: "resolver error is not logged twice",
			do:   func() { d.ReportError(errors.New("no such host")) },
		},
		{
			name: "rejected update logs nothing",
			do: func() {
				if err := d.UpdateState(state("x:1", "x:1")); err == nil {
					t.Error("UpdateState with a duplicate succeeded")
				}
			},
		},
		{
			name: "empty set",
			do:   func() { mustUpdate(t, d, resolver.State{}) },
			want: []logRecord{
				r("INFO", "backend removed", "backend", "b:1"),
				r("INFO", "backend removed", "backend", "c:1"),
				r("WARN", "backend set is empty; picks fail until backends return"),
			},
		},
	}
	for _, step := range steps {
		step.do()
		if diff := cmp.Diff(step.want, records()); diff != "" {
			t.Errorf("%s: logs mismatch (-want +got):\n%s", step.name, diff)
		}
	}
}

func TestPickLogsAtDebug(t *testing.T) {
	t.Parallel()
	logger, records := captureLogs(t, slog.LevelDebug)
	d, err := New(Config{Logger: logger, Rand: fakeRand(func(int) int { return 0 })})
	if err != nil {
		t.Fatal(err)
	}
	mustUpdate(t, d, state("a:1"))
	records() // drop the "backend added" record
	_, done := mustPick(t, d)
	done(nil)
	want := []logRecord{{
		"level": "DEBUG", "msg": "picked backend", "component": "director",
		"backend": "a:1", "method": "/test.Service/Method", "policy": RoundRobin,
	}}
	if diff := cmp.Diff(want, records()); diff != "" {
		t.Errorf("logs mismatch (-want +got):\n%s", diff)
	}
}

func TestPickAllocations(t *testing.T) {
	// Not parallel: AllocsPerRun measures the whole process.
	for _, policy := range Policies() {
		t.Run(policy, func(t *testing.T) {
			d, err := New(Config{Policy: policy, HashHeader: testHashHeader, Logger: discardLogger()})
			if err != nil {
				t.Fatal(err)
			}
			mustUpdate(t, d, state("a:1", "b:1", "c:1", "d:1"))
			ctx := context.Background()
			allocs := testing.AllocsPerRun(1000, func() {
				_, done, _ := d.Pick(ctx, "/s/m")
				done(nil)
			})
			// One for the per-call record, one for the method value bound to it.
			if allocs > 2 {
				t.Errorf("Pick+done allocates %v times per call, want at most 2", allocs)
			}
		})
	}
}

func BenchmarkPick(b *testing.B) {
	for _, policy := range Policies() {
		for _, n := range []int{3, 100} {
			b.Run(fmt.Sprintf("%s/backends=%d", policy, n), func(b *testing.B) {
				d, err := New(Config{Policy: policy, HashHeader: testHashHeader, Logger: discardLogger()})
				if err != nil {
					b.Fatal(err)
				}
				var s resolver.State
				for i := range n {
					s.Addresses = append(s.Addresses, resolver.Address{Addr: fmt.Sprintf("10.0.0.%d:80", i)})
				}
				if err := d.UpdateState(s); err != nil {
					b.Fatal(err)
				}
				b.ReportAllocs()
				b.RunParallel(func(pb *testing.PB) {
					ctx := context.Background()
					for pb.Next() {
						_, done, _ := d.Pick(ctx, "/s/m")
						done(nil)
					}
				})
			})
		}
	}
}

// testHashHeader is the RingHash key header tests configure; other policies
// ignore it.
const testHashHeader = "x-user"

// TestResolveNow checks that a stream ending with Unavailable, and only
// that, asks the resolver to look again, whatever the policy.
func TestResolveNow(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		err  error
		want int64
	}{
		{name: "success", err: nil},
		{name: "unavailable", err: errUnavailable, want: 1},
		{name: "wrapped unavailable", err: fmt.Errorf("relay: %w", errUnavailable), want: 1},
		{name: "not found", err: errNotFound},
		{name: "internal", err: errInternal},
		{name: "canceled", err: errCanceled},
		{name: "deadline", err: errDeadline},
		{name: "plain error", err: errors.New("reset")},
	}
	for _, tc := range tests {
		for _, policy := range Policies() {
			t.Run(tc.name+"/"+policy, func(t *testing.T) {
				t.Parallel()
				var calls atomic.Int64
				d, err := New(Config{Policy: policy, HashHeader: testHashHeader, Logger: discardLogger(), ResolveNow: func() { calls.Add(1) }})
				if err != nil {
					t.Fatal(err)
				}
				mustUpdate(t, d, state("a:1", "b:1", "c:1"))
				_, done := mustPick(t, d)
				done(tc.err)
				done(tc.err) // only the first call counts
				if got := calls.Load(); got != tc.want {
					t.Errorf("ResolveNow called %d times, want %d", got, tc.want)
				}
			})
		}
	}
}

// TestResolveNowConcurrent ends many streams with Unavailable at once; the
// counting fake must see each exactly once. Run with -race.
func TestResolveNowConcurrent(t *testing.T) {
	t.Parallel()
	var calls atomic.Int64
	d, err := New(Config{Logger: discardLogger(), EjectAfter: -1, ResolveNow: func() { calls.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	mustUpdate(t, d, state("a:1", "b:1"))
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 100 {
				_, done, err := d.Pick(context.Background(), "/s/m")
				if err != nil {
					t.Errorf("Pick() error = %v", err)
					return
				}
				done(errUnavailable)
			}
		})
	}
	wg.Wait()
	if got := calls.Load(); got != 800 {
		t.Errorf("ResolveNow called %d times, want 800", got)
	}
}

// TestDoneCountsCancelsAsNeither: a call that ended CANCELLED (the client
// gave up or went away, or the proxy did not use the pick) is neither a
// success nor a failure of its backend; any other error is a failure.
func TestDoneCountsCancelsAsNeither(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name          string
		err           error
		wantSuccesses int64
		wantFailures  int64
	}{
		{name: "ok", err: nil, wantSuccesses: 1},
		{name: "status CANCELLED", err: status.Error(codes.Canceled, "streamlb: client reset the stream")},
		{name: "context.Canceled", err: context.Canceled},
		{name: "wrapped context.Canceled", err: fmt.Errorf("call: %w", context.Canceled)},
		{name: "DEADLINE_EXCEEDED", err: status.Error(codes.DeadlineExceeded, "deadline"), wantFailures: 1},
		{name: "UNAVAILABLE", err: status.Error(codes.Unavailable, "down"), wantFailures: 1},
		{name: "INTERNAL", err: status.Error(codes.Internal, "bug"), wantFailures: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := newTestDirector(t)
			mustUpdate(t, d, state("a:1"))
			_, done := mustPick(t, d)
			done(tc.err)
			want := []BackendStats{{Addr: "a:1", Weight: 1, Successes: tc.wantSuccesses, Failures: tc.wantFailures, Healthy: true}}
			if diff := cmp.Diff(want, d.Backends()); diff != "" {
				t.Errorf("Backends() after done(%v) (-want +got):\n%s", tc.err, diff)
			}
		})
	}
}
