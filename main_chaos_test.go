//go:build linux

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestChaosSoak runs every fault of the earlier attack rounds together
// against one proxy process with a configuration file of three or four
// clusters: a DNS-discovered one (SRV records of the embedded DNS server),
// a static one and a fixed one nobody touches. For the whole run, steady
// clients make a mix of unary, server-, client- and bidi-streaming calls
// (some with deadlines, some cancelled mid-call, some failing on purpose),
// churning clients connect and disconnect, idle ones wait; meanwhile
// backends are restarted in rolling fashion (a replacement on a new port,
// published through DNS or a reloaded file, then the old one drained and
// stopped), now and then killed hard mid-stream, and the file is reloaded
// every few seconds with other policies, retry settings, health checks and
// a cluster added and removed.
//
// It checks that every call that failed failed with the status it was
// made to get or, around a hard kill of a backend of its cluster, with
// UNAVAILABLE (a rolling restart and a reload lose no call); that the
// proxy's goroutines, file descriptors, heap and backend connections come
// back near their level before the churn; and that the metrics of the
// fixed cluster and the access log agree with what the clients saw.
//
// By default it runs 5 s of chaos (about 20 s in all, under -race);
// STREAMLB_SOAK=1 runs it for STREAMLB_SOAK_DURATION (default 3m).
// STREAMLB_SOAK_ENGINE=grpc-proxy runs the reference engine instead (which
// retries nothing, so a refused call is not counted against it), and
// STREAMLB_SOAK_PROFILES=DIR saves the proxy's heap profiles before and
// after the churn, for go tool pprof -base; STREAMLB_SOAK_CLIENTS=N runs N
// steady clients instead of 6 (and N/3 churning ones).
func TestChaosSoak(t *testing.T) {
	d := 5 * time.Second
	if os.Getenv("STREAMLB_SOAK") == "1" {
		d = 3 * time.Minute
		if s := os.Getenv("STREAMLB_SOAK_DURATION"); s != "" {
			v, err := time.ParseDuration(s)
			if err != nil {
				t.Fatalf("STREAMLB_SOAK_DURATION: %v", err)
			}
			d = v
		}
	} else if testing.Short() {
		t.Skip("a chaos run of 20 s; not in -short")
	}
	runChaos(t, d)
}

type chaosBackend struct {
	name, cluster, addr string
	ts                  *testserver.Server
}

type chaosEvent struct {
	from, to time.Time
	kind     string // "kill", "graceful"
	cluster  string
	addr     string
}

type chaosFailure struct {
	cluster, kind string
	start, end    time.Time
	code          codes.Code
	want          codes.Code
	err           string
}

type chaosRig struct {
	t      *testing.T
	ctx    context.Context
	quiet  *slog.Logger
	dns    *testserver.DNSServer
	dir    string
	conf   string
	p      *proc
	proxy  string
	admin  string
	srvTgt string

	mu                sync.Mutex
	seq               int
	dyn, stat, fixed  []*chaosBackend
	all               []*chaosBackend
	events            []chaosEvent
	variant           int
	tally             map[string]map[codes.Code]int // cluster → code → calls
	failures          []chaosFailure
	kinds             map[string]int
	extraPresentCalls int
}

const chaosSRV = "_grpc._tcp.dyn.chaos.test"

// chaosHTTP asks the admin listener on a new connection each time, so
// that the connections of the test's own scrapes do not count in the
// proxy's goroutines and descriptors.
var chaosHTTP = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}

func (r *chaosRig) startBackend(cluster string) *chaosBackend {
	r.t.Helper()
	return r.startBackendAt(cluster, "127.0.0.1:0")
}

func (r *chaosRig) startBackendAt(cluster, addr string) *chaosBackend {
	r.t.Helper()
	r.mu.Lock()
	r.seq++
	name := fmt.Sprintf("%s-%d", cluster, r.seq)
	r.mu.Unlock()
	ts, err := testserver.New(testserver.Config{Name: name, Logger: r.quiet})
	if err != nil {
		r.t.Fatal(err)
	}
	var err2 error
	for range 50 {
		if err2 = ts.Start(addr); err2 == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err2 != nil {
		r.t.Fatal(err2)
	}
	b := &chaosBackend{name: name, cluster: cluster, addr: ts.Addr(), ts: ts}
	r.mu.Lock()
	r.all = append(r.all, b)
	r.mu.Unlock()
	return b
}

func (r *chaosRig) publishDyn() {
	r.mu.Lock()
	var srvs []testserver.SRV
	for _, b := range r.dyn {
		port, _ := strconv.Atoi(b.addr[strings.LastIndexByte(b.addr, ':')+1:])
		srvs = append(srvs, testserver.SRV{Target: "b.chaos.test.", Port: uint16(port), Weight: 1})
	}
	r.mu.Unlock()
	r.dns.SetSRV(chaosSRV, srvs...)
}

// writeConfig writes the file for the current variant and state, through
// a rename so the proxy never reads it half-written, and sends SIGHUP when
// hup is set (otherwise the proxy's poll of the file picks it up).
func (r *chaosRig) writeConfig(hup bool) {
	r.t.Helper()
	r.mu.Lock()
	v := r.variant
	addrs := func(bs []*chaosBackend) string {
		var s []string
		for _, b := range bs {
			s = append(s, b.addr)
		}
		return strings.Join(s, ", ")
	}
	stat, fixed := addrs(r.stat), addrs(r.fixed)
	r.mu.Unlock()
	dynPolicy := []string{"ring_hash", "round_robin", "least_request", "peak_ewma", "random", "weighted_round_robin"}[v%6]
	statPolicy := []string{"least_request", "round_robin", "random", "peak_ewma"}[v%4]
	retry := []string{
		"retry_on: [/grpc.testing.TestService/UnaryCall]\n  max_retries: 2\n  retry_budget: 100\n",
		"retry_on: [/grpc.testing.TestService/]\n  max_retries: 1\n  retry_budget: 50\n  retry_budget_ratio: 0.5\n",
		"retry_on: []\n  max_retries: 2\n",
	}[v%3]
	var b strings.Builder
	fmt.Fprintf(&b, "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\ndrain_timeout: 5s\nengine: %s\n", cmpOr(os.Getenv("STREAMLB_SOAK_ENGINE"), "frame"))
	// Short idle timeouts, so that closing idle connections races with
	// new calls on both sides all the time.
	fmt.Fprintf(&b, "proxy:\n  idle_timeout: 1500ms\n  backend_idle_timeout: 250ms\n  %s", retry)
	fmt.Fprintf(&b, "clusters:\n")
	fmt.Fprintf(&b, "  - name: dyn\n    targets: [\"dns+srv://%s/%s\"]\n    dns_refresh: 150ms\n    policy: %s\n", r.dns.Addr(), chaosSRV, dynPolicy)
	if dynPolicy == "ring_hash" {
		fmt.Fprintf(&b, "    hash_header: x-user\n")
	}
	if v%2 == 0 {
		fmt.Fprintf(&b, "    health_check: {interval: 300ms, timeout: 1s}\n")
	}
	fmt.Fprintf(&b, "  - name: stat\n    targets: [%s]\n    policy: %s\n", stat, statPolicy)
	if v%3 == 1 {
		fmt.Fprintf(&b, "    slow_start: 2s\n")
	}
	fmt.Fprintf(&b, "  - name: fixed\n    targets: [%s]\n    retry: {retry_on: [], max_retries: 1, budget: 10, budget_ratio: 0.1}\n", fixed)
	if v%2 == 1 {
		fmt.Fprintf(&b, "  - name: extra\n    targets: [%s]\n    policy: random\n", fixed)
	}
	fmt.Fprintf(&b, "routes:\n")
	for _, c := range []string{"dyn", "fixed", "extra"} {
		if c == "extra" && v%2 == 0 {
			continue
		}
		fmt.Fprintf(&b, "  - {name: %s, match: {headers: [{name: x-cluster, exact: %s}]}, cluster: %s}\n", c, c, c)
	}
	fmt.Fprintf(&b, "  - {name: default, cluster: stat}\n")
	tmp := filepath.Join(r.dir, "next.yaml")
	if err := os.WriteFile(tmp, []byte(b.String()), 0o600); err != nil {
		r.t.Fatal(err)
	}
	if err := os.Rename(tmp, r.conf); err != nil {
		r.t.Fatal(err)
	}
	if hup && r.p != nil {
		r.p.cmd.Process.Signal(syscall.SIGHUP)
	}
}

// backends returns the addresses of cluster's backends in /backends.
func (r *chaosRig) backends(cluster string) []string {
	resp, err := chaosHTTP.Get("http://" + r.admin + "/backends")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var m map[string][]struct {
		Addr string `json:"addr"`
	}
	if json.NewDecoder(resp.Body).Decode(&m) != nil {
		return nil
	}
	var out []string
	for _, b := range m[cluster] {
		out = append(out, b.Addr)
	}
	return out
}

// waitSet waits until cluster's set has in and lacks out.
func (r *chaosRig) waitSet(cluster, in, out string) bool {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) && r.ctx.Err() == nil {
		set := r.backends(cluster)
		if slices.Contains(set, in) && !slices.Contains(set, out) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.t.Errorf("cluster %s never had %s without %s", cluster, in, out)
	return false
}

func (r *chaosRig) event(e chaosEvent) {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
}

// roll replaces backend i of cluster (dyn or stat) with a new one:
// published first, the old one drained by the proxy, then stopped
// gracefully. With kill, the old one is stopped hard first instead.
func (r *chaosRig) roll(cluster string, i int, mode string) {
	var set *[]*chaosBackend
	if cluster == "dyn" {
		set = &r.dyn
	} else {
		set = &r.stat
	}
	r.mu.Lock()
	old := (*set)[i]
	r.mu.Unlock()
	switch mode {
	case "kill":
		from := time.Now()
		old.ts.Stop()
		r.event(chaosEvent{from: from, to: time.Now(), kind: "kill", cluster: cluster, addr: old.addr})
	case "bounce":
		// A pod told to stop before discovery let go of it: GOAWAY, no
		// more connections, the calls in flight finish.
		from := time.Now()
		sctx, cancel := context.WithTimeout(r.ctx, 15*time.Second)
		if err := old.ts.Shutdown(sctx); err != nil {
			r.t.Errorf("backend %s of %s did not finish its calls in 15 s: %v", old.name, cluster, err)
		}
		cancel()
		r.event(chaosEvent{from: from, to: time.Now(), kind: "bounce", cluster: cluster, addr: old.addr})
	}
	if mode == "inplace-kill" || mode == "inplace-graceful" {
		// A restart on the same address: nothing for discovery to see.
		from := time.Now()
		if mode == "inplace-kill" {
			old.ts.Stop()
		} else {
			sctx, cancel := context.WithTimeout(r.ctx, 15*time.Second)
			old.ts.Shutdown(sctx)
			cancel()
		}
		nb := r.startBackendAt(cluster, old.addr)
		r.event(chaosEvent{from: from, to: time.Now(), kind: mode, cluster: cluster, addr: old.addr})
		r.mu.Lock()
		(*set)[i] = nb
		r.mu.Unlock()
		// It gets calls again.
		deadline := time.Now().Add(20 * time.Second)
		for nb.ts.Calls() == 0 && time.Now().Before(deadline) && r.ctx.Err() == nil {
			time.Sleep(20 * time.Millisecond)
		}
		if nb.ts.Calls() == 0 {
			r.t.Errorf("backend %s of %s restarted in place (%s) got no call in 20 s", old.addr, cluster, mode)
		}
		return
	}
	nb := r.startBackend(cluster)
	r.mu.Lock()
	(*set)[i] = nb
	r.mu.Unlock()
	if cluster == "dyn" {
		r.publishDyn()
	} else {
		r.writeConfig(rand.IntN(2) == 0)
	}
	if !r.waitSet(cluster, nb.addr, old.addr) || mode != "graceful" {
		return
	}
	from := time.Now()
	sctx, cancel := context.WithTimeout(r.ctx, 15*time.Second)
	if err := old.ts.Shutdown(sctx); err != nil {
		r.t.Errorf("backend %s of %s did not finish its calls 15 s after the proxy dropped it: %v (in flight %d)", old.name, cluster, err, old.ts.InFlight())
	}
	cancel()
	r.event(chaosEvent{from: from, to: time.Now(), kind: "graceful", cluster: cluster, addr: old.addr})
}

func (r *chaosRig) record(cluster, kind string, start time.Time, want codes.Code, err error) {
	code := status.Code(err)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.tally[cluster] == nil {
		r.tally[cluster] = map[codes.Code]int{}
	}
	r.tally[cluster][code]++
	r.kinds[kind]++
	if code != want {
		r.failures = append(r.failures, chaosFailure{cluster: cluster, kind: kind, start: start, end: time.Now(), code: code, want: want, err: fmt.Sprint(err)})
	}
}

var errChaosData = status.Error(codes.DataLoss, "chaos: the answer's payload is not what was asked for")

// chaosCall makes one call of kind on client with the x-cluster header,
// and records it.
func (r *chaosRig) chaosCall(ctx context.Context, client testgrpc.TestServiceClient, cluster, kind string) {
	start := time.Now()
	ctx = metadata.AppendToOutgoingContext(ctx, "x-cluster", cluster, "x-user", strconv.Itoa(rand.IntN(50)))
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	want := codes.OK
	var err error
	switch kind {
	case "unary":
		size := rand.IntN(48 << 10)
		var resp *testgrpc.SimpleResponse
		resp, err = client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: int32(size), Payload: &testgrpc.Payload{Body: make([]byte, rand.IntN(4096))}})
		if err == nil && (len(resp.GetPayload().GetBody()) != size || testserver.CheckPayloadBody(resp.GetPayload().GetBody()) != nil) {
			err = errChaosData
		}
	case "fail":
		want = codes.NotFound
		_, err = client.EmptyCall(metadata.AppendToOutgoingContext(ctx, testserver.MetadataFailCode, "5"), &testgrpc.Empty{})
	case "slow":
		dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
		_, err = client.EmptyCall(metadata.AppendToOutgoingContext(dctx, testserver.MetadataDelay, "80ms"), &testgrpc.Empty{})
		dcancel()
	case "deadline":
		want = codes.DeadlineExceeded
		dctx, dcancel := context.WithTimeout(ctx, 150*time.Millisecond)
		_, err = client.EmptyCall(metadata.AppendToOutgoingContext(dctx, testserver.MetadataDelay, "3s"), &testgrpc.Empty{})
		dcancel()
	case "sstream", "cancel", "lstream":
		n, cut, interval, maxSize := 4, -1, 15000, 32<<10
		switch kind {
		case "cancel":
			n, cut, want = 12, 2, codes.Canceled
		case "lstream":
			// About 2 s, so that faults land in the middle of it, with
			// messages the proxy holds back whole (up to 100 KiB).
			n, interval, maxSize = 16, 120000, 100<<10
		}
		sctx, scancel := context.WithCancel(ctx)
		req := &testgrpc.StreamingOutputCallRequest{}
		var sizes []int
		for range n {
			s := 1 + rand.IntN(maxSize)
			sizes = append(sizes, s)
			req.ResponseParameters = append(req.ResponseParameters, &testgrpc.ResponseParameters{Size: int32(s), IntervalUs: int32(interval)})
		}
		var st testgrpc.TestService_StreamingOutputCallClient
		st, err = client.StreamingOutputCall(sctx, req)
		for i := 0; err == nil; i++ {
			if i == cut {
				scancel()
			}
			var m *testgrpc.StreamingOutputCallResponse
			m, err = st.Recv()
			if err == nil && (i >= n || len(m.GetPayload().GetBody()) != sizes[i] || testserver.CheckPayloadBody(m.GetPayload().GetBody()) != nil) {
				err = errChaosData
			} else if errors.Is(err, io.EOF) {
				err = nil
				if i != n {
					err = errChaosData
				}
				break
			}
		}
		scancel()
	case "cstream":
		var st testgrpc.TestService_StreamingInputCallClient
		st, err = client.StreamingInputCall(ctx)
		sum := 0
		for i := 0; err == nil && i < 4; i++ {
			s := rand.IntN(16 << 10)
			sum += s
			err = st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, s)}})
			time.Sleep(5 * time.Millisecond)
		}
		if err == nil || errors.Is(err, io.EOF) {
			// io.EOF from Send: the status is CloseAndRecv's.
			var resp *testgrpc.StreamingInputCallResponse
			resp, err = st.CloseAndRecv()
			if err == nil && int(resp.GetAggregatedPayloadSize()) != sum {
				err = errChaosData
			}
		}
	case "bidi", "lbidi":
		rounds, pause := 4, time.Duration(0)
		if kind == "lbidi" {
			rounds, pause = 12, 150*time.Millisecond
		}
		var st testgrpc.TestService_FullDuplexCallClient
		st, err = client.FullDuplexCall(ctx)
		for i := 0; err == nil && i < rounds; i++ {
			time.Sleep(pause)
			s := 1 + rand.IntN(16<<10)
			err = st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: int32(s)}}, Payload: &testgrpc.Payload{Body: make([]byte, rand.IntN(8<<10))}})
			if errors.Is(err, io.EOF) {
				_, err = st.Recv()
				break
			}
			if err == nil {
				var m *testgrpc.StreamingOutputCallResponse
				m, err = st.Recv()
				if err == nil && (len(m.GetPayload().GetBody()) != s || testserver.CheckPayloadBody(m.GetPayload().GetBody()) != nil) {
					err = errChaosData
				}
			}
		}
		if err == nil {
			st.CloseSend()
			if _, err = st.Recv(); errors.Is(err, io.EOF) {
				err = nil
			} else if err == nil {
				err = errChaosData
			}
		}
	}
	r.record(cluster, kind, start, want, err)
}

var chaosKinds = []string{"unary", "unary", "unary", "fail", "slow", "deadline", "sstream", "sstream", "cancel", "cstream", "bidi", "bidi", "lstream", "lbidi"}
var chaosClusters = []string{"dyn", "dyn", "stat", "stat", "fixed", "extra"}

func chaosDial(t *testing.T, addr string) *grpc.ClientConn {
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	return cc
}

// chaosSnap is what the soak measures of the proxy process.
type chaosSnap struct {
	goroutines, fds, rssKiB int
	heapLive                float64
	backendConns            map[string]float64
	clientConns             float64
	inFlight                float64
	profile                 string
}

func (s chaosSnap) String() string {
	return fmt.Sprintf("goroutines %d, fds %d, RSS %d KiB, live heap %.1f MiB, backend conns %v, client conns %v, calls in flight %v",
		s.goroutines, s.fds, s.rssKiB, s.heapLive/(1<<20), s.backendConns, s.clientConns, s.inFlight)
}

// chaosMetrics returns the samples of family name, by their labels
// ("k=v,k=v", sorted by the exposition).
func chaosMetrics(t *testing.T, admin string, names ...string) map[string]map[string]float64 {
	t.Helper()
	resp, err := chaosHTTP.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	out := map[string]map[string]float64{}
	for _, name := range names {
		out[name] = map[string]float64{}
		for _, m := range fams[name].GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName()+"="+l.GetValue())
			}
			out[name][strings.Join(labels, ",")] += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return out
}

func (r *chaosRig) snap() chaosSnap {
	r.t.Helper()
	var s chaosSnap
	resp, err := chaosHTTP.Get("http://" + r.admin + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		r.t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	s.profile = string(b)
	first, _, _ := strings.Cut(s.profile, "\n")
	if _, err := fmt.Sscanf(first, "goroutine profile: total %d", &s.goroutines); err != nil {
		r.t.Fatalf("goroutine profile starts %q", first)
	}
	// The live heap: a heap profile with gc=1 collects first.
	if resp, err := chaosHTTP.Get("http://" + r.admin + "/debug/pprof/heap?gc=1"); err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	pid := r.p.cmd.Process.Pid
	s.fds = openFDs(pid)
	s.rssKiB = procStatus(r.t, pid, "VmRSS")
	m := chaosMetrics(r.t, r.admin, "go_memstats_heap_alloc_bytes", "streamlb_backend_connections", "streamlb_client_connections", "streamlb_calls_in_flight")
	s.heapLive = m["go_memstats_heap_alloc_bytes"][""]
	s.backendConns = m["streamlb_backend_connections"]
	s.clientConns = m["streamlb_client_connections"][""]
	for _, v := range m["streamlb_calls_in_flight"] {
		s.inFlight += v
	}
	return s
}

func runChaos(t *testing.T, chaosFor time.Duration) {
	ctx := testkit.Context(t, chaosFor+3*time.Minute)
	r := &chaosRig{t: t, ctx: ctx, quiet: slog.New(slog.DiscardHandler), dir: t.TempDir(),
		tally: map[string]map[codes.Code]int{}, kinds: map[string]int{}}
	r.conf = filepath.Join(r.dir, "streamlb.yaml")
	t.Cleanup(func() {
		r.mu.Lock()
		all := slices.Clone(r.all)
		r.mu.Unlock()
		for _, b := range all {
			b.ts.Stop()
		}
	})
	r.dns = testserver.NewDNSServer(testserver.DNSConfig{DefaultTTL: 1, Logger: r.quiet})
	if err := r.dns.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.dns.Stop)
	r.dns.SetA("b.chaos.test", "127.0.0.1")
	for range 3 {
		r.dyn = append(r.dyn, r.startBackend("dyn"))
		r.stat = append(r.stat, r.startBackend("stat"))
	}
	for range 2 {
		r.fixed = append(r.fixed, r.startBackend("fixed"))
	}
	r.publishDyn()
	r.writeConfig(false)
	accessLog := filepath.Join(r.dir, "access.log")
	r.p = startProc(t, "proxy", "--config", r.conf, "--log-format", "json", "--access-log", accessLog, "--release-startup-pages=false")
	rec, _ := r.p.waitLog(ctx, t, 0, "listening")
	r.proxy = rec.Addr
	rec, _ = r.p.waitLog(ctx, t, 0, "admin listening")
	r.admin = rec.Addr
	testkit.WaitFor(ctx, t, "three dyn backends", func() bool { return len(r.backends("dyn")) == 3 })

	// Warm up: every kind on every cluster, then let the connections idle
	// out, and take the baseline.
	cc := chaosDial(t, r.proxy)
	client := testgrpc.NewTestServiceClient(cc)
	for _, c := range []string{"dyn", "stat", "fixed"} {
		for _, k := range chaosKinds {
			if k != "lstream" && k != "lbidi" {
				r.chaosCall(ctx, client, c, k)
			}
		}
	}
	cc.Close()
	settle := func(base *chaosSnap) chaosSnap {
		var s chaosSnap
		deadline := time.Now().Add(45 * time.Second)
		for {
			time.Sleep(500 * time.Millisecond)
			s = r.snap()
			total := 0.0
			for _, v := range s.backendConns {
				total += v
			}
			done := s.clientConns == 0 && total == 0 && s.inFlight == 0
			if base != nil {
				done = done && s.goroutines <= base.goroutines+2 && s.fds <= base.fds
			}
			if done || time.Now().After(deadline) {
				return s
			}
		}
	}
	time.Sleep(3 * time.Second) // the idle timeouts
	base := settle(nil)
	t.Logf("baseline: %v", base)
	r.saveHeap("base")
	r.mu.Lock()
	warmFailures := len(r.failures)
	r.tally = map[string]map[codes.Code]int{}
	r.kinds = map[string]int{}
	r.mu.Unlock()
	if warmFailures > 0 {
		t.Fatalf("%d calls failed while warming up, before any fault: %+v", warmFailures, r.failures)
	}
	m0 := chaosMetrics(t, r.admin, "streamlb_calls_finished_total")["streamlb_calls_finished_total"]
	al0 := chaosAccessLog(t, accessLog)

	loadCtx, stopLoad := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var calls atomic.Int64
	// Idle clients: one call at the start, one at the end.
	var idle []*grpc.ClientConn
	for range 3 {
		cc := chaosDial(t, r.proxy)
		idle = append(idle, cc)
		r.chaosCall(ctx, testgrpc.NewTestServiceClient(cc), "fixed", "unary")
	}
	// Nearly idle clients: a call every 1.2 to 2.2 s, about when the
	// proxy's idle timeout (1.5 s, up to a quarter more) closes their
	// connection.
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cc := chaosDial(t, r.proxy)
			defer cc.Close()
			client := testgrpc.NewTestServiceClient(cc)
			for n := 0; n < 10000 && loadCtx.Err() == nil; n++ {
				select {
				case <-loadCtx.Done():
				case <-time.After(time.Duration(1200+rand.IntN(1000)) * time.Millisecond):
					r.chaosCall(ctx, client, chaosClusters[(i+n)%len(chaosClusters)], "unary")
					calls.Add(1)
				}
			}
		}()
	}
	// Steady clients, each on a connection of its own.
	steady, churn := 6, 2
	if n, err := strconv.Atoi(os.Getenv("STREAMLB_SOAK_CLIENTS")); err == nil && n > 0 {
		steady, churn = n, max(2, n/3)
	}
	for i := range steady {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cc := chaosDial(t, r.proxy)
			defer cc.Close()
			client := testgrpc.NewTestServiceClient(cc)
			for n := 0; n < 200000 && loadCtx.Err() == nil; n++ {
				c := chaosClusters[(i+n)%len(chaosClusters)]
				r.chaosCall(ctx, client, c, chaosKinds[rand.IntN(len(chaosKinds))])
				calls.Add(1)
			}
		}()
	}
	// Churning clients: a new connection for one to three calls, closed
	// at once; now and then with a call still running.
	for range churn {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < 100000 && loadCtx.Err() == nil; n++ {
				cc := chaosDial(t, r.proxy)
				client := testgrpc.NewTestServiceClient(cc)
				for range 1 + rand.IntN(3) {
					r.chaosCall(ctx, client, chaosClusters[rand.IntN(4)], chaosKinds[rand.IntN(len(chaosKinds))])
					calls.Add(1)
				}
				if rand.IntN(4) == 0 {
					// Abandon a call: the connection closes under it.
					started := make(chan struct{})
					go func() {
						st, err := client.FullDuplexCall(metadata.AppendToOutgoingContext(ctx, "x-cluster", "dyn"))
						if err == nil {
							st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10, IntervalUs: 200000}}})
						}
						close(started)
						if err == nil {
							for {
								if _, err := st.Recv(); err != nil {
									return
								}
							}
						}
					}()
					<-started
					time.Sleep(time.Duration(rand.IntN(30)) * time.Millisecond)
				}
				cc.Close()
			}
		}()
	}
	// Scrape now and then, as Prometheus would, and keep the peak.
	var peak chaosSnap
	var peakMu sync.Mutex
	wg.Add(1)
	go func() {
		defer wg.Done()
		for loadCtx.Err() == nil {
			s := r.snap()
			peakMu.Lock()
			if s.goroutines > peak.goroutines {
				peak = s
			}
			peakMu.Unlock()
			select {
			case <-loadCtx.Done():
			case <-time.After(time.Second):
			}
		}
	}()

	// The chaos: a fault every 0.7 s or so, taking turns.
	chaosEnd := time.Now().Add(chaosFor)
	counts := map[string]int{}
	for step := 0; time.Now().Before(chaosEnd) && ctx.Err() == nil; step++ {
		switch step % 8 {
		case 0:
			c := []string{"dyn", "stat"}[step/8%2]
			mode := []string{"graceful", "inplace-graceful", "inplace-kill"}[step/16%3]
			r.roll(c, rand.IntN(3), mode)
			counts[c+" "+mode]++
		case 1, 5:
			r.mu.Lock()
			r.variant++
			r.mu.Unlock()
			hup := step%16 == 1
			r.writeConfig(hup)
			counts["reloads"]++
			if step%16 == 5 {
				// A burst of SIGHUPs: reloads of an unchanged file and
				// access log reopenings, one after the other.
				for range 10 {
					r.p.cmd.Process.Signal(syscall.SIGHUP)
					time.Sleep(10 * time.Millisecond)
				}
				counts["sighup bursts"]++
			}
			if step%24 == 1 {
				// The service has no pods for a moment: an empty answer
				// empties the set (calls fail fast), then they are back.
				from := time.Now()
				r.dns.SetSRV(chaosSRV)
				time.Sleep(time.Duration(200+rand.IntN(300)) * time.Millisecond)
				r.publishDyn()
				r.event(chaosEvent{from: from, to: time.Now(), kind: "empty", cluster: "dyn"})
				counts["dyn emptied"]++
			}
		case 2:
			r.roll("stat", rand.IntN(3), "graceful")
			counts["stat rolled"]++
		case 3:
			r.roll("dyn", rand.IntN(3), "kill")
			counts["dyn killed"]++
		case 4:
			r.roll("stat", rand.IntN(3), "graceful")
			counts["stat rolled"]++
		case 6:
			c := []string{"dyn", "stat"}[step/8%2]
			r.roll(c, rand.IntN(3), "bounce")
			counts[c+" bounced"]++
			// A DNS outage: the last set stays.
			if step/8%3 == 0 {
				r.dns.SetDown(true)
			} else {
				r.dns.SetFailure(2) // SERVFAIL
			}
			time.Sleep(time.Duration(300+rand.IntN(700)) * time.Millisecond)
			r.dns.SetDown(false)
			r.dns.SetFailure(0)
			counts["dns outages"]++
		case 7:
			if step%16 == 7 {
				r.roll("stat", rand.IntN(3), "kill")
				counts["stat killed"]++
			} else {
				r.roll("dyn", rand.IntN(3), "graceful")
				counts["dyn rolled"]++
			}
		}
		time.Sleep(time.Duration(300+rand.IntN(700)) * time.Millisecond)
	}
	// End on the baseline's shape (no extra cluster, health checks on).
	r.mu.Lock()
	if r.variant%2 == 1 {
		r.variant++
	}
	r.mu.Unlock()
	r.writeConfig(true)
	time.Sleep(time.Second)
	stopLoad()
	wg.Wait()
	for _, cc := range idle {
		r.chaosCall(ctx, testgrpc.NewTestServiceClient(cc), "fixed", "unary")
		cc.Close()
	}
	t.Logf("chaos for %v: %v; %d calls; kinds %v", chaosFor, counts, calls.Load(), r.kinds)
	t.Logf("peak under chaos: %v", peak)

	// (2), (3): back near the baseline.
	after := settle(&base)
	t.Logf("after settling: %v", after)
	r.saveHeap("after")
	if after.goroutines > base.goroutines+10 {
		t.Errorf("goroutines %d after the churn, %d before", after.goroutines, base.goroutines)
		t.Logf("before:\n%s\nafter:\n%s", base.profile, after.profile)
	}
	if after.fds > base.fds+4 {
		t.Errorf("open fds %d after the churn, %d before", after.fds, base.fds)
	}
	total := 0.0
	for _, v := range after.backendConns {
		total += v
	}
	if total > 2 {
		t.Errorf("backend connections %v after the churn and the idle timeout", after.backendConns)
	}
	if after.inFlight != 0 {
		t.Errorf("streamlb_calls_in_flight adds up to %v with no client left", after.inFlight)
	}
	if after.heapLive > 2*base.heapLive+16<<20 {
		t.Errorf("live heap %.1f MiB after the churn, %.1f MiB before", after.heapLive/(1<<20), base.heapLive/(1<<20))
	}

	// The sets, in /backends and the metrics, are the backends running,
	// and the removed cluster left no series behind.
	r.mu.Lock()
	for c, bs := range map[string][]*chaosBackend{"dyn": r.dyn, "stat": r.stat, "fixed": r.fixed} {
		var want []string
		for _, b := range bs {
			want = append(want, b.addr)
		}
		got := r.backends(c)
		slices.Sort(want)
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("/backends has %v in cluster %s, want %v", got, c, want)
		}
	}
	r.mu.Unlock()
	if code := chaosGet(t, "http://"+r.admin+"/readyz"); code != http.StatusOK {
		t.Errorf("/readyz = %d after the chaos", code)
	}
	resp, err := chaosHTTP.Get("http://" + r.admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	text, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	stale := map[string]int{}
	for _, l := range strings.Split(string(text), "\n") {
		if strings.HasPrefix(l, "streamlb_") && strings.Contains(l, `cluster="extra"`) {
			name, _, _ := strings.Cut(l, "{")
			stale[name]++
		}
	}
	if len(stale) > 0 {
		t.Logf("series of the removed cluster extra: %v", stale)
	}
	gauges := chaosMetrics(t, r.admin, "streamlb_backends", "streamlb_backend_ejected", "streamlb_backend_healthy")
	t.Logf("after: %v", gauges)

	// (4): metrics of the fixed cluster, nobody's backends touched, as the
	// clients saw them.
	m1 := chaosMetrics(t, r.admin, "streamlb_calls_finished_total")["streamlb_calls_finished_total"]
	fixedByCode := map[string]float64{}
	for k, v := range m1 {
		if strings.Contains(k, "cluster=fixed") {
			_, code, _ := strings.Cut(k, "code=")
			code, _, _ = strings.Cut(code, ",")
			fixedByCode[code] += v - m0[k]
		}
	}
	r.mu.Lock()
	fixedSeen := map[string]float64{}
	for code, n := range r.tally["fixed"] {
		fixedSeen[code.String()] += float64(n)
	}
	r.mu.Unlock()
	t.Logf("cluster fixed: metrics %v, clients %v", fixedByCode, fixedSeen)
	for _, code := range []string{"OK", "NotFound"} {
		if fixedByCode[code] != fixedSeen[code] {
			t.Errorf("cluster fixed: %v calls finished %s in the metrics, the clients saw %v", fixedByCode[code], code, fixedSeen[code])
		}
	}

	// Last, a drain under load: SIGTERM while steady clients run. The
	// calls in flight (none longer than the drain timeout) finish; the
	// calls the clients start once the proxy has stopped accepting fail
	// UNAVAILABLE.
	r.mu.Lock()
	fromFailure := len(r.failures)
	r.mu.Unlock()
	var sigterm atomic.Int64 // Unix nanoseconds
	loadCtx, stopLoad = context.WithCancel(ctx)
	for i := range steady {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cc := chaosDial(t, r.proxy)
			defer cc.Close()
			client := testgrpc.NewTestServiceClient(cc)
			for n := 0; n < 200000 && loadCtx.Err() == nil && sigterm.Load() == 0; n++ {
				r.chaosCall(ctx, client, chaosClusters[(i+n)%len(chaosClusters)], chaosKinds[rand.IntN(len(chaosKinds))])
			}
		}()
	}
	time.Sleep(1500 * time.Millisecond)
	sigterm.Store(time.Now().UnixNano())
	stopProc(ctx, t, r.p)
	stopLoad()
	wg.Wait()
	r.mu.Lock()
	drainFailures := slices.Clone(r.failures[fromFailure:])
	r.failures = r.failures[:fromFailure]
	r.mu.Unlock()
	termAt := time.Unix(0, sigterm.Load())
	var early int
	for _, f := range drainFailures {
		// A call the client started within a few milliseconds of the
		// signal may have reached the proxy after it stopped accepting.
		if f.start.Before(termAt.Add(-50 * time.Millisecond)) {
			early++
			t.Errorf("a call in flight at SIGTERM failed: %s %s started %v before, want %s: %s", f.cluster, f.kind, termAt.Sub(f.start).Round(time.Millisecond), f.want, f.err)
		}
	}
	t.Logf("drain under load: %d calls failed, %d of them in flight at SIGTERM", len(drainFailures), early)

	al1 := chaosAccessLog(t, accessLog)
	logged, seen := map[string]int{}, map[string]int{}
	for k, v := range al1 {
		logged[k] = v - al0[k]
	}
	r.mu.Lock()
	for _, byCode := range r.tally {
		for code, n := range byCode {
			seen[code.String()] += n
		}
	}
	r.mu.Unlock()
	t.Logf("access log by code %v; clients by code %v", logged, seen)
	for _, code := range []string{"OK", "NotFound"} {
		if logged[code] != seen[code] {
			t.Errorf("access log: %d calls %s, the clients saw %d", logged[code], code, seen[code])
		}
	}
	var lines []string
	r.p.mu.Lock()
	for _, l := range r.p.logs {
		lines = append(lines, l.Level+" "+l.Msg)
	}
	r.p.mu.Unlock()
	t.Logf("the proxy's log: %v", chaosDistinct(lines))

	// (1): every failure explained.
	r.mu.Lock()
	defer r.mu.Unlock()
	explained := map[string]int{}
	var unexplained []chaosFailure
	for _, f := range r.failures {
		if f.code == codes.Unavailable && slices.ContainsFunc(r.events, func(e chaosEvent) bool {
			return (e.kind == "kill" || e.kind == "inplace-kill") && (e.cluster == f.cluster || f.cluster == "extra" && e.cluster == "stat") &&
				e.from.Before(f.end) && e.to.After(f.start.Add(-100*time.Millisecond))
		}) {
			explained[fmt.Sprintf("UNAVAILABLE around a hard kill: %s %s", f.kind, chaosShort(f.err))]++
			continue
		}
		// While the set is empty (and a refresh, 150 ms, after), new
		// calls fail fast with UNAVAILABLE; calls in flight go on.
		if f.code == codes.Unavailable && slices.ContainsFunc(r.events, func(e chaosEvent) bool {
			return e.kind == "empty" && e.cluster == f.cluster && f.start.After(e.from) && f.start.Before(e.to.Add(time.Second))
		}) {
			explained[fmt.Sprintf("UNAVAILABLE while the set was empty: %s %s", f.kind, chaosShort(f.err))]++
			continue
		}
		if os.Getenv("STREAMLB_SOAK_ENGINE") == "grpc-proxy" && f.code == codes.Unavailable && strings.Contains(f.err, "connection refused") {
			// That engine does not retry (README, "Retries, caps and
			// the connection settings apply to the frame engine").
			explained["UNAVAILABLE, refused, not retried by the grpc-proxy engine"]++
			continue
		}
		unexplained = append(unexplained, f)
	}
	t.Logf("failures explained: %v; unexplained: %d", explained, len(unexplained))
	byCause := map[string]int{}
	for _, f := range unexplained {
		byCause[fmt.Sprintf("%s %s want %s: %s", f.cluster, f.kind, f.want, f.code)]++
	}
	for i, f := range unexplained {
		if i == 20 {
			break
		}
		var near []string
		for _, e := range r.events {
			if e.to.After(f.start.Add(-2*time.Second)) && e.from.Before(f.end.Add(2*time.Second)) {
				near = append(near, fmt.Sprintf("%s %s %s %+.3fs", e.kind, e.cluster, e.addr, e.from.Sub(f.start).Seconds()))
			}
		}
		t.Errorf("unexplained: %s %s want %s got %s after %v: %s; events near: %v", f.cluster, f.kind, f.want, f.code, f.end.Sub(f.start).Round(time.Millisecond), f.err, near)
	}
	if len(unexplained) > 0 {
		t.Errorf("%d calls failed without a fault to explain them: %v", len(unexplained), byCause)
	}
}

func chaosDistinct(s []string) map[string]int {
	m := map[string]int{}
	for _, v := range s {
		m[v]++
	}
	return m
}

// chaosAccessLog counts the access log's lines by code.
func chaosAccessLog(t *testing.T, path string) map[string]int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return map[string]int{}
		}
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]int{}
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var l struct {
			Msg  string `json:"msg"`
			Code string `json:"code"`
		}
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.Msg == "call" {
			out[l.Code]++
		}
	}
	return out
}

// chaosShort is err's message without the addresses and numbers that make
// each one different.
func chaosShort(err string) string {
	var b strings.Builder
	for _, r := range err {
		if r >= '0' && r <= '9' {
			if !strings.HasSuffix(b.String(), "N") {
				b.WriteByte('N')
			}
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

func chaosGet(t *testing.T, url string) int {
	t.Helper()
	resp, err := chaosHTTP.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// saveHeap writes the proxy's heap profile, after a collection, to
// STREAMLB_SOAK_PROFILES/heap-name.pb.gz when that is set, to compare with
// go tool pprof -base.
func (r *chaosRig) saveHeap(name string) {
	dir := os.Getenv("STREAMLB_SOAK_PROFILES")
	if dir == "" {
		return
	}
	resp, err := chaosHTTP.Get("http://" + r.admin + "/debug/pprof/heap?gc=1")
	if err != nil {
		r.t.Error(err)
		return
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if err := os.WriteFile(filepath.Join(dir, "heap-"+name+".pb.gz"), b, 0o600); err != nil {
		r.t.Error(err)
	}
}
