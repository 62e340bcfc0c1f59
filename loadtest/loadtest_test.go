package loadtest_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
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
	if n := strings.Count(page.String(), "<svg"); n != 3 {
		t.Errorf("HTML has %d <svg> elements, want 3 (backends, timeline, histogram)", n)
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
// The duration counts from the start of ghz's run, its dialling included,
// as ghz's own -z does: on a loaded machine that took all of a 300ms run,
// which then made no call; 2s leaves room.
func TestRunDuration(t *testing.T) {
	verifyNoLeaks(t)
	backends := startLoadBackends(t, 2)
	addr := startLoadProxy(t, backends)

	res := runLoad(t, loadtest.Config{Target: addr, Call: emptyCall, Duration: 2 * time.Second, Concurrency: 4, RPS: 200})
	if res.EndReason != loadtest.EndDuration {
		t.Errorf("end reason %q, want %q: reaching --duration is the normal end of such a run", res.EndReason, loadtest.EndDuration)
	}
	// The pacer's ticks at both ends of the run, the calls in flight when
	// it stops, and a timer late on a loaded machine are allowed for: the
	// bound is on the run's own length.
	if limit := uint64(200*res.Total.Seconds()) + 4 + 1; res.Count == 0 || res.Count > limit {
		t.Errorf("got %d calls in %v at 200/s with 4 workers, want 1..%d", res.Count, res.Total, limit)
	}
	var attributed int64
	for _, b := range res.Backends {
		attributed += b.Calls
	}
	if attributed != int64(res.Count) {
		t.Errorf("backend table has %d calls, summary %d", attributed, res.Count)
	}
}

// TestRunStopsAtOnce ends runs by a Duration so short that the timer
// fires while ghz is still starting its workers. ghz's own worker ticker
// then closed its channel under the goroutine about to send on it: "send
// on closed channel", a crash, or a data race under -race, seen about once
// in 30 such runs. Every run must end by its duration, with a consistent
// report.
func TestRunStopsAtOnce(t *testing.T) {
	verifyNoLeaks(t)
	backends := startLoadBackends(t, 1)
	for i := range 30 {
		d := time.Duration(i%5)*time.Millisecond + time.Nanosecond
		res := runLoad(t, loadtest.Config{Target: backends[0].Addr(), Call: emptyCall, Duration: d, Concurrency: 4, RPS: 200})
		if res.EndReason != loadtest.EndDuration {
			t.Errorf("run %d (%v): end reason %q, want %q", i, d, res.EndReason, loadtest.EndDuration)
		}
		var attributed int64
		for _, b := range res.Backends {
			attributed += b.Calls
		}
		if attributed != int64(res.Count) {
			t.Errorf("run %d (%v): backend table has %d calls, summary %d", i, d, attributed, res.Count)
		}
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
	dead := testkit.DeadAddr(t)

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
	// A run bounded by time, long enough for several ticks, and for calls
	// to start on a loaded machine (the time includes the connection's
	// setup: 200 ms made no call in about one run in ten at a load
	// average of 17).
	res, err := loadtest.Run(ctx, loadtest.Config{
		Target: backends[0].Addr(), Call: emptyCall, Duration: time.Second,
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

// timelineTotals sums the timeline's calls and errors per backend.
func timelineTotals(tl loadtest.Timeline) (calls, errs map[string]int64) {
	calls, errs = map[string]int64{}, map[string]int64{}
	for _, p := range tl.Points {
		for j, name := range tl.Backends {
			calls[name] += p.Calls[j]
			errs[name] += p.Errors[j]
		}
	}
	return calls, errs
}

// TestRunTimeline checks the timeline of a run through the proxy against the
// backend rows, the backends' own counters and the JSON report, and that
// the run's settings are in the Result.
func TestRunTimeline(t *testing.T) {
	verifyNoLeaks(t)
	backends := startLoadBackends(t, 3)
	addr := startLoadProxy(t, backends)

	before := time.Now()
	res := runLoad(t, loadtest.Config{Target: addr, Call: emptyCall, Total: 900, Concurrency: 10, RPS: 1500,
		Metadata: map[string]string{"x-note": "timeline"}})

	gotCalls, gotErrs := timelineTotals(res.Timeline)
	rowCalls, rowErrs, counters := map[string]int64{}, map[string]int64{}, map[string]int64{}
	for _, b := range res.Backends {
		rowCalls[b.Name], rowErrs[b.Name] = b.Calls, b.Errors
	}
	for _, b := range backends {
		counters[b.Name()] = b.MethodCalls(emptyCallPath)
	}
	if diff := cmp.Diff(rowCalls, gotCalls); diff != "" {
		t.Errorf("timeline calls differ from the backend rows (-rows +timeline):\n%s", diff)
	}
	if diff := cmp.Diff(rowErrs, gotErrs); diff != "" {
		t.Errorf("timeline errors differ from the backend rows (-rows +timeline):\n%s", diff)
	}
	if diff := cmp.Diff(counters, gotCalls); diff != "" {
		t.Errorf("timeline calls differ from the backends' counters (-backends +timeline):\n%s", diff)
	}
	if n := len(res.Timeline.Points); n < 3 {
		t.Errorf("%d timeline points for a run of ~600ms, want several", n)
	}
	if len(res.Timeline.Events) != 0 {
		t.Errorf("events %+v, want none: every backend served throughout", res.Timeline.Events)
	}

	if res.Started.Before(before) || res.Started.After(time.Now()) {
		t.Errorf("started %v, want during the test", res.Started)
	}
	if res.Request.Data != "{}" || res.Request.Total != 900 || res.Request.RPS != 1500 || res.Request.Metadata["x-note"] != "timeline" {
		t.Errorf("request %+v, want the run's settings", res.Request)
	}
	if res.WireLatency.P50 <= 0 || res.WireLatency.P50 > res.Latency.P99 {
		t.Errorf("wire p50 %v, client p99 %v: want 0 < wire p50 <= client p99", res.WireLatency.P50, res.Latency.P99)
	}

	var buf bytes.Buffer
	if err := res.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	var j loadtest.JSONReport
	if err := json.Unmarshal(buf.Bytes(), &j); err != nil {
		t.Fatal(err)
	}
	jsonCalls := map[string]int64{}
	for i := range j.Timeline.Calls {
		for k, name := range j.Timeline.Backends {
			jsonCalls[name] += j.Timeline.Calls[i][k]
		}
	}
	if diff := cmp.Diff(gotCalls, jsonCalls); diff != "" {
		t.Errorf("JSON timeline differs (-Result +JSON):\n%s", diff)
	}
	if j.Started == "" || j.Request.Total != 900 || !strings.HasPrefix(j.Clocks.Latency, "client") || !strings.HasPrefix(j.Clocks.Backends, "wire") {
		t.Errorf("JSON started %q, request %+v, clocks %+v: want the run's time, settings and named clocks", j.Started, j.Request, j.Clocks)
	}
}

// TestRunBackendStops stops one of two backends half-way through a run: the
// timeline shows it vanishing, and nothing of it after that.
func TestRunBackendStops(t *testing.T) {
	verifyNoLeaks(t)
	backends := startLoadBackends(t, 2)
	addr := startLoadProxy(t, backends)
	victim := backends[1]

	const total = 2000
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for backends[0].MethodCalls(emptyCallPath)+victim.MethodCalls(emptyCallPath) < total/2 {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
		victim.Stop()
	}()
	res, err := loadtest.Run(ctx, loadtest.Config{Target: addr, Call: emptyCall, Total: total, Concurrency: 8, RPS: 1000, Timeout: 5 * time.Second}, nil)
	<-stopped
	if err != nil {
		t.Fatal(err)
	}

	tl := res.Timeline
	col := slices.Index(tl.Backends, victim.Name())
	if col < 0 {
		t.Fatalf("timeline backends %v lack %s", tl.Backends, victim.Name())
	}
	var vanished *loadtest.BackendEvent
	for i, e := range tl.Events {
		if e.Backend == victim.Name() && e.Kind == loadtest.EventVanished {
			vanished = &tl.Events[i]
		}
	}
	end := tl.Points[len(tl.Points)-1].Start + tl.Interval
	if vanished == nil || vanished.At < end/4 || vanished.At > end*3/4 {
		t.Fatalf("events %+v (run of %v): want %s to vanish around half-way", tl.Events, end, victim.Name())
	}
	for _, p := range tl.Points {
		if p.Start >= vanished.At && p.Calls[col] != 0 {
			t.Errorf("%s has %d calls at %v, after it vanished at %v", victim.Name(), p.Calls[col], p.Start, vanished.At)
		}
	}
	last := tl.Points[len(tl.Points)-1]
	if survivor := slices.Index(tl.Backends, backends[0].Name()); last.Calls[survivor] == 0 && tl.Points[len(tl.Points)-2].Calls[survivor] == 0 {
		t.Errorf("%s has no calls at the end of the run: %+v", backends[0].Name(), tl.Points)
	}
	calls, _ := timelineTotals(tl)
	for _, b := range res.Backends {
		if calls[b.Name] != b.Calls {
			t.Errorf("%s: timeline %d calls, row %d", b.Name, calls[b.Name], b.Calls)
		}
	}
	var out bytes.Buffer
	if err := res.WriteTimeline(&out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "-"+victim.Name()) {
		t.Errorf("terminal timeline lacks the vanish mark -%s:\n%s", victim.Name(), out.String())
	}
	out.Reset()
	if err := res.WriteHTML(&out); err != nil {
		t.Fatal(err)
	}
	if mark := "▼ " + victim.Name() + " vanished"; !strings.Contains(out.String(), mark) {
		t.Errorf("HTML report lacks the mark %q", mark)
	}
}
