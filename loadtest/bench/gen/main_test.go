//go:build unix

package main

import (
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/streamlb/streamlb/testserver"
)

func startBackends(t *testing.T, names ...string) []string {
	t.Helper()
	var addrs []string
	for _, name := range names {
		srv, err := testserver.New(testserver.Config{Name: name, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		if err := srv.Start("127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Stop)
		addrs = append(addrs, srv.Addr())
	}
	return addrs
}

func TestRun(t *testing.T) {
	t.Parallel()
	addrs := startBackends(t, "a", "b", "c")
	tests := []struct {
		name      string
		o         options
		wantCount int
		wantSplit map[string]int // backend -> calls
	}{
		{name: "one target, unary", o: options{target: addrs[0], conc: 4, total: 30, size: 100}, wantCount: 30, wantSplit: map[string]int{"a": 30}},
		// grpc-go's round_robin over three ready subchannels is exact.
		{name: "client round_robin", o: options{targets: strings.Join(addrs, ","), conc: 1, total: 30, size: 100}, wantCount: 30, wantSplit: map[string]int{"a": 10, "b": 10, "c": 10}},
		{name: "stream", o: options{target: addrs[1], conc: 2, total: 3, stream: true}, wantCount: 3, wantSplit: map[string]int{"b": 3}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.o.timeout = 10 * time.Second
			rep, err := run(tc.o)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Count != tc.wantCount || rep.Errors != 0 {
				t.Errorf("got %d calls, %d failed; want %d, 0 (%v)", rep.Count, rep.Errors, tc.wantCount, rep.ErrorMessages)
			}
			got := map[string]int{}
			for _, b := range rep.Backends {
				got[b.Name] = b.Count
			}
			for name, n := range tc.wantSplit {
				if got[name] != n {
					t.Errorf("backend %s: got %d calls, want %d (split %v)", name, got[name], n, got)
				}
			}
			if len(got) != len(tc.wantSplit) {
				t.Errorf("split %v, want %v", got, tc.wantSplit)
			}
			// The process's CPU (here the backends' and the parallel
			// subtests' too: TestProcessCPU checks the figure itself).
			if rep.CPUMS <= 0 {
				t.Errorf("cpu_ms %.3f, want the CPU the calls took", rep.CPUMS)
			}
		})
	}
}

// TestProcessCPU: processCPU follows the CPU a busy loop burns, and not
// the wall clock while the process sleeps.
func TestProcessCPU(t *testing.T) {
	c0 := processCPU()
	if c0 < 0 {
		t.Fatal("processCPU: -1 on a unix system")
	}
	deadline := time.Now().Add(10 * time.Second)
	x := 0
	for processCPU()-c0 < 30*time.Millisecond && time.Now().Before(deadline) {
		for i := range 100000 {
			x += i
		}
	}
	if burnt := processCPU() - c0; burnt < 30*time.Millisecond {
		t.Fatalf("a busy loop of 10s raised processCPU by %v (%d), want 30ms", burnt, x)
	}
	c1 := processCPU()
	time.Sleep(200 * time.Millisecond)
	if slept := processCPU() - c1; slept >= 150*time.Millisecond {
		t.Errorf("processCPU rose by %v over a 200ms sleep, want the CPU used, not the time passed", slept)
	}
}

// TestRunRate checks that the pacer never starts more calls than the rate
// allows: an upper bound only, as a busy machine may make fewer.
func TestRunRate(t *testing.T) {
	t.Parallel()
	addrs := startBackends(t, "a")
	rep, err := run(options{target: addrs[0], conc: 5, rate: 100, duration: 500 * time.Millisecond, timeout: 10 * time.Second, size: 10})
	if err != nil {
		t.Fatal(err)
	}
	// The pacer starts no more than rate x elapsed calls, however late
	// the machine lets it or the deadline run.
	if bound := int(100*rep.Seconds) + 1; rep.Count > bound || rep.Errors != 0 {
		t.Errorf("got %d calls (%d failed) in %.3fs at 100/s; want at most %d, none failed", rep.Count, rep.Errors, rep.Seconds, bound)
	}
	if rep.Count == 0 {
		t.Error("no calls made")
	}
}

func TestRunRejects(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		o    options
		want string
	}{
		{name: "no target", o: options{conc: 1, total: 1}, want: "exactly one"},
		{name: "both targets", o: options{target: "127.0.0.1:1", targets: "127.0.0.1:2", conc: 1, total: 1}, want: "exactly one"},
		{name: "not loopback", o: options{target: "10.0.0.1:80", conc: 1, total: 1}, want: "loopback"},
		{name: "unbounded", o: options{target: "127.0.0.1:1", conc: 1}, want: "-n, -duration"},
		{name: "no workers", o: options{target: "127.0.0.1:1", total: 1}, want: "-c must be positive"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := run(tc.o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestRunStopMark checks the fault-run mode: stream workers beside the
// unary ones on the one connection, the "after" window opened by the mark,
// and the load ended early by stop with every call accounted for.
func TestRunStopMark(t *testing.T) {
	t.Parallel()
	addrs := startBackends(t, "a")
	stop, mark := make(chan struct{}), make(chan struct{})
	ready := t.TempDir() + "/ready"
	type result struct {
		rep *report
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := run(options{target: addrs[0], conc: 2, streamWorkers: 1, duration: time.Minute,
			timeout: 10 * time.Second, size: 10, ready: ready, stop: stop, mark: mark})
		done <- result{rep, err}
	}()
	// The load runs until stop, well before the minute of -duration.
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for range tick.C {
		if _, err := os.Stat(ready); err == nil {
			break
		}
	}
	close(mark)
	time.AfterFunc(300*time.Millisecond, func() { close(stop) })
	var res result
	select {
	case res = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("run did not end after stop")
	}
	if res.err != nil {
		t.Fatal(res.err)
	}
	rep := res.rep
	if rep.Seconds > 20 {
		t.Errorf("run took %.1fs: stop did not end it", rep.Seconds)
	}
	if rep.Errors != 0 || len(rep.ErrorCodes) != 0 {
		t.Errorf("%d errors %v, want none", rep.Errors, rep.ErrorCodes)
	}
	u, s := rep.Kinds["unary"], rep.Kinds["stream"]
	if u == nil || s == nil || u.Count == 0 || s.Count == 0 || u.Count+s.Count != rep.Count {
		t.Fatalf("kinds %+v %+v, want unary and stream calls adding up to %d", u, s, rep.Count)
	}
	if rep.After == nil || rep.After.Count == 0 || rep.After.Count > rep.Count {
		t.Fatalf("after %+v, want some of the %d calls", rep.After, rep.Count)
	}
	if len(rep.After.Backends) != 1 || rep.After.Backends[0].Name != "a" || rep.After.Backends[0].Count != rep.After.Count {
		t.Errorf("after split %+v, want all %d calls on a", rep.After.Backends, rep.After.Count)
	}
}

func TestRunStreamWorkersNeedDuration(t *testing.T) {
	t.Parallel()
	if _, err := run(options{target: "127.0.0.1:1", conc: 1, total: 5, streamWorkers: 1}); err == nil ||
		!strings.Contains(err.Error(), "-duration") {
		t.Errorf("run = %v, want an error asking for -duration", err)
	}
}

func TestLongestGap(t *testing.T) {
	tests := []struct {
		name    string
		ns      []int64
		wantMS  float64
		wantEnd float64
	}{
		{name: "none", ns: nil},
		{name: "one", ns: []int64{5e9}},
		{name: "unsorted", ns: []int64{3e9, 1e9, 1.5e9, 9e9, 9.5e9}, wantMS: 6000, wantEnd: 9},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			gotMS, gotEnd := longestGap(tc.ns)
			if gotMS != tc.wantMS || gotEnd != tc.wantEnd {
				t.Errorf("longestGap(%v) = %v ms, end %v; want %v ms, end %v", tc.ns, gotMS, gotEnd, tc.wantMS, tc.wantEnd)
			}
		})
	}
}
