package loadtest_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/loadtest"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
)

const (
	emptyCall     = "grpc.testing.TestService/EmptyCall"
	emptyCallPath = "/grpc.testing.TestService/EmptyCall"
	streamCall    = "grpc.testing.TestService/StreamingOutputCall"
	streamPath    = "/grpc.testing.TestService/StreamingOutputCall"
)

var quietLog = slog.New(slog.DiscardHandler)

// verifyNoLeaks checks, after every other cleanup of t has run, that no
// goroutine started during the test is left.
func verifyNoLeaks(t *testing.T) {
	t.Helper()
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
}

// startLoadBackends starts n testservers on loopback, stopped at cleanup.
func startLoadBackends(t *testing.T, n int) []*testserver.Server {
	t.Helper()
	var out []*testserver.Server
	for i := range n {
		ts, err := testserver.New(testserver.Config{Name: fmt.Sprintf("backend-%d", i+1), Logger: quietLog})
		if err != nil {
			t.Fatal(err)
		}
		if err := ts.Start("127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ts.Stop)
		out = append(out, ts)
	}
	return out
}

// startLoadProxy starts the frame proxy with round robin over backends and
// returns its address. It is shut down at cleanup.
func startLoadProxy(t *testing.T, backends []*testserver.Server) string {
	t.Helper()
	var targets []string
	for _, b := range backends {
		targets = append(targets, b.Addr())
	}
	d, err := director.New(director.Config{Policy: director.RoundRobin, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	res, err := resolver.NewStatic(targets)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.UpdateState(res.State()); err != nil {
		t.Fatal(err)
	}
	srv, err := proxy.New(proxy.Config{Picker: d, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("proxy shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, proxy.ErrServerClosed) {
			t.Errorf("proxy serve: %v", err)
		}
	})
	return ln.Addr().String()
}

// deadAddr returns a loopback address that refuses connections: bound, then
// closed.
func deadAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func runLoad(t *testing.T, cfg loadtest.Config) *loadtest.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := loadtest.Run(ctx, cfg, nil)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	return res
}

// TestRunThroughProxy is the end-to-end check: calls over one connection to
// the frame proxy, the report's split against the backends' own counters,
// the balance assertion, and the three output formats.
func TestRunThroughProxy(t *testing.T) {
	verifyNoLeaks(t)
	backends := startLoadBackends(t, 3)
	addr := startLoadProxy(t, backends)

	res := runLoad(t, loadtest.Config{Target: addr, Call: emptyCall, Total: 600, Concurrency: 10, Name: "e2e"})

	if res.Count != 600 || res.Errors != 0 {
		t.Fatalf("got %d calls, %d failed; want 600, 0 (status codes %v)", res.Count, res.Errors, res.StatusCodes)
	}
	if got := res.StatusCodes["OK"]; got != 600 {
		t.Errorf("status codes %v, want OK: 600", res.StatusCodes)
	}
	got := map[string]int64{}
	for _, b := range res.Backends {
		got[b.Name] = b.Calls
		if b.Errors != 0 {
			t.Errorf("backend %s: %d errors, want 0", b.Name, b.Errors)
		}
		if b.P50 <= 0 || b.P99 < b.P50 {
			t.Errorf("backend %s: p50 %v p99 %v, want 0 < p50 <= p99", b.Name, b.P50, b.P99)
		}
	}
	want := map[string]int64{}
	for _, b := range backends {
		want[b.Name()] = b.MethodCalls(emptyCallPath)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("calls per backend: report differs from the backends' counters (-backends +report):\n%s", diff)
	}
	if err := res.CheckBalance(10, 3); err != nil {
		t.Errorf("CheckBalance(10, 3) on round robin: %v", err)
	}

	// JSON: the documented schema, and nothing that is not JSON.
	var buf bytes.Buffer
	if err := res.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	var raw map[string]any
	if err := json.Unmarshal(buf.Bytes(), &raw); err != nil {
		t.Fatalf("WriteJSON output does not parse: %v\n%s", err, buf.String())
	}
	for _, key := range []string{"target", "call", "connections", "concurrency", "count", "total_ms", "rps", "latency", "status_codes", "backends"} {
		if _, ok := raw[key]; !ok {
			t.Errorf("JSON lacks %q:\n%s", key, buf.String())
		}
	}
	for _, key := range []string{"avg_ms", "p50_ms", "p90_ms", "p99_ms"} {
		if _, ok := raw["latency"].(map[string]any)[key]; !ok {
			t.Errorf("JSON latency lacks %q", key)
		}
	}
	var rep loadtest.JSONReport
	dec := json.NewDecoder(&buf)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rep); err != nil {
		t.Fatalf("JSON does not decode into JSONReport: %v", err)
	}
	if rep.Target != addr || rep.Call != emptyCall || rep.Count != 600 || rep.Connections != 1 || rep.Concurrency != 10 || len(rep.Backends) != 3 {
		t.Errorf("JSON report %+v does not match the run", rep)
	}
	for _, b := range rep.Backends {
		if b.Calls != want[b.Name] {
			t.Errorf("JSON backend %s: %d calls, want %d", b.Name, b.Calls, want[b.Name])
		}
		if b.Share < 30 || b.Share > 37 {
			t.Errorf("JSON backend %s: share %v, want about 33.3 (percent)", b.Name, b.Share)
		}
	}

	// Table and HTML mention every backend.
	var table, page bytes.Buffer
	if err := res.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	if err := res.WriteHTML(&page); err != nil {
		t.Fatal(err)
	}
	for _, b := range backends {
		if !strings.Contains(table.String(), b.Name()) {
			t.Errorf("table lacks backend %s:\n%s", b.Name(), table.String())
		}
		if !strings.Contains(page.String(), b.Name()) {
			t.Errorf("HTML lacks backend %s", b.Name())
		}
	}
	for _, s := range []string{"Requests/sec", "Status codes", "OK"} {
		if !strings.Contains(table.String(), s) {
			t.Errorf("table lacks %q:\n%s", s, table.String())
		}
	}
	if n := strings.Count(page.String(), "<svg"); n != 2 {
		t.Errorf("HTML has %d <svg> elements, want 2 (backends, histogram)", n)
	}
	for _, s := range []string{"<script", "http://", "https://"} {
		if s == "http://" && strings.Count(page.String(), s) == strings.Count(page.String(), `xmlns="http://www.w3.org/2000/svg"`) {
			continue // the SVG namespace is a name, not a fetch
		}
		if strings.Contains(page.String(), s) {
			t.Errorf("HTML is not self-contained: it contains %q", s)
		}
	}
}

// TestRunStreaming sends server streams of 4 × 64 KiB through the proxy:
// DATA frames span many reads, and the split must still match.
func TestRunStreaming(t *testing.T) {
	verifyNoLeaks(t)
	backends := startLoadBackends(t, 3)
	addr := startLoadProxy(t, backends)

	res := runLoad(t, loadtest.Config{
		Target: addr, Call: streamCall, Total: 60, Concurrency: 4,
		Data: []byte(`{"response_parameters":[{"size":65536},{"size":65536},{"size":65536},{"size":65536}]}`),
	})
	if res.Count != 60 || res.Errors != 0 {
		t.Fatalf("got %d calls, %d failed; want 60, 0 (%v)", res.Count, res.Errors, res.StatusCodes)
	}
	for _, b := range backends {
		var got int64
		for _, row := range res.Backends {
			if row.Name == b.Name() {
				got = row.Calls
			}
		}
		if want := b.MethodCalls(streamPath); got != want {
			t.Errorf("backend %s: report %d calls, backend counted %d", b.Name(), got, want)
		}
	}
}

// TestRunDuration bounds a run by time only: it ends by the timer, and with
// the default "wait" stop every call is in both the summary and the table.
func TestRunDuration(t *testing.T) {
	verifyNoLeaks(t)
	backends := startLoadBackends(t, 2)
	addr := startLoadProxy(t, backends)

	res := runLoad(t, loadtest.Config{Target: addr, Call: emptyCall, Duration: 300 * time.Millisecond, Concurrency: 4, RPS: 200})
	if res.EndReason != "timeout" {
		t.Errorf("end reason %q, want timeout", res.EndReason)
	}
	if res.Count == 0 || res.Count > 200 {
		t.Errorf("got %d calls in 300ms at 200/s, want 1..200", res.Count)
	}
	var attributed int64
	for _, b := range res.Backends {
		attributed += b.Calls
	}
	if attributed != int64(res.Count) {
		t.Errorf("backend table has %d calls, summary %d", attributed, res.Count)
	}
}

// TestRunSkewed calls one backend directly: with three expected, the balance
// assertion must fail and name it.
func TestRunSkewed(t *testing.T) {
	verifyNoLeaks(t)
	backends := startLoadBackends(t, 1)

	res := runLoad(t, loadtest.Config{Target: backends[0].Addr(), Call: emptyCall, Total: 100, Concurrency: 5})
	if len(res.Backends) != 1 || res.Backends[0].Share != 100 {
		t.Fatalf("backends %+v, want one with 100%%", res.Backends)
	}
	if err := res.CheckBalance(10, 0); err != nil {
		t.Errorf("one backend seen, none expected: %v, want pass", err)
	}
	err := res.CheckBalance(10, 3)
	var be *loadtest.BalanceError
	if !errors.As(err, &be) {
		t.Fatalf("CheckBalance(10, 3) = %v, want a *BalanceError", err)
	}
	if want := "balance assertion failed: backend backend-1 got 100.0% (even share 33.3%, allowed ±10)"; err.Error() != want {
		t.Errorf("error\n got %q\nwant %q", err, want)
	}
}

// TestRunBadInput checks that each mistake gives one clear line.
func TestRunBadInput(t *testing.T) {
	verifyNoLeaks(t)
	backends := startLoadBackends(t, 1)
	live := backends[0].Addr()
	dead := deadAddr(t)

	tests := []struct {
		name    string
		cfg     loadtest.Config
		wantErr string
	}{
		{name: "unknown method", cfg: loadtest.Config{Target: live, Call: "grpc.testing.TestService/Nope"}, wantErr: "Nope"},
		{name: "unknown service", cfg: loadtest.Config{Target: live, Call: "no.Such/Call"}, wantErr: "no.Such"},
		{name: "unreachable", cfg: loadtest.Config{Target: dead, Call: emptyCall}, wantErr: "cannot reach " + dead + ": connect: connection refused"},
		{name: "malformed data", cfg: loadtest.Config{Target: live, Call: emptyCall, Data: []byte(`{"a":`)}, wantErr: "request data is not valid JSON"},
		{name: "data not fitting", cfg: loadtest.Config{Target: live, Call: emptyCall, Data: []byte(`{"no_such_field":1}`)}, wantErr: "no_such_field"},
		{name: "no call", cfg: loadtest.Config{Target: live}, wantErr: "no call"},
		{name: "bad call", cfg: loadtest.Config{Target: live, Call: "nodots"}, wantErr: `call "nodots" is not package.Service/Method`},
		{name: "no target", cfg: loadtest.Config{Call: emptyCall}, wantErr: "no target"},
		{name: "target without port", cfg: loadtest.Config{Target: "localhost", Call: emptyCall}, wantErr: "not HOST:PORT"},
		{name: "more connections than workers", cfg: loadtest.Config{Target: live, Call: emptyCall, Concurrency: 2, Connections: 3}, wantErr: "connections (3) must not exceed concurrency (2)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			res, err := loadtest.Run(ctx, tc.cfg, nil)
			if err == nil {
				t.Fatalf("Run succeeded (%d calls), want error containing %q", res.Count, tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q, want it to contain %q", err, tc.wantErr)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error spans lines: %q", err)
			}
		})
	}
}

// lockedBuffer is a bytes.Buffer safe for the progress goroutine and the
// test to share.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestRunProgress checks the progress lines: written while the run lasts,
// one per line when not on a terminal.
func TestRunProgress(t *testing.T) {
	verifyNoLeaks(t)
	backends := startLoadBackends(t, 1)
	var progress lockedBuffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// A run bounded by time, long enough for several ticks.
	res, err := loadtest.Run(ctx, loadtest.Config{
		Target: backends[0].Addr(), Call: emptyCall, Duration: 200 * time.Millisecond,
		Concurrency: 2, RPS: 100, ProgressInterval: 20 * time.Millisecond,
	}, &progress)
	if err != nil {
		t.Fatal(err)
	}
	out := progress.String()
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) < 2 {
		t.Fatalf("got %d progress lines, want several:\n%s", len(lines), out)
	}
	for _, l := range lines {
		if !strings.HasPrefix(l, "loadtest: ") || !strings.Contains(l, "calls/s") || strings.Contains(l, "\r") {
			t.Errorf("progress line %q is not a plain status line", l)
		}
	}
	if res.Count == 0 {
		t.Error("no calls made")
	}
}

// TestRunCancel cancels a long run: Run returns soon with the partial result
// and an error saying so.
func TestRunCancel(t *testing.T) {
	verifyNoLeaks(t)
	backends := startLoadBackends(t, 1)
	ctx, cancel := context.WithCancel(context.Background())
	var progress lockedBuffer
	done := make(chan struct{})
	var res *loadtest.Result
	var err error
	go func() {
		defer close(done)
		res, err = loadtest.Run(ctx, loadtest.Config{
			Target: backends[0].Addr(), Call: emptyCall, Duration: time.Minute,
			Concurrency: 2, RPS: 200, ProgressInterval: 10 * time.Millisecond,
		}, &progress)
	}()
	// Cancel once calls are flowing, as the progress lines show.
	waitCtx, waitCancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer waitCancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !progressShowsCalls(progress.String()) {
		select {
		case <-done:
			t.Fatalf("Run returned before cancel: %v", err)
		case <-waitCtx.Done():
			t.Fatalf("no calls seen on the progress lines: %q", progress.String())
		case <-tick.C:
		}
	}
	cancel()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	if !errors.Is(err, context.Canceled) {
		t.Errorf("err %v, want context.Canceled", err)
	}
	if res == nil || res.Count == 0 {
		t.Errorf("want a partial result with calls, got %+v", res)
	}
}

// progressShowsCalls reports whether the last complete progress line in out
// counts at least one call.
func progressShowsCalls(out string) bool {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var sec float64
	var calls int
	_, err := fmt.Sscanf(lines[len(lines)-1], "loadtest: %fs %d calls", &sec, &calls)
	return err == nil && calls > 0
}
