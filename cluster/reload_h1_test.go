package cluster_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// counterValue returns the value of the counter name with the label
// cluster=clusterName in reg, or -1 if there is none.
func counterValue(t *testing.T, reg *prometheus.Registry, name, clusterName string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "cluster" && l.GetValue() == clusterName {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return -1
}

// TestH1ReloadZKHostUnresolvable: a reload adds a cluster whose zk://
// target names a host that does not resolve at that moment (a Service not
// created yet, a DNS hiccup). The README: any ZooKeeper failure "keeps the
// last set, logs a warning and lists again after a backoff of 1 s
// doubling to 30 s". Here the client cannot even be built (go-zookeeper
// resolves its hosts once, in Connect): ZK.Run returns the error, the
// Group passes it to ReportError without a log, and that target is never
// tried again. The cluster has no backend for good, and a SIGHUP with the
// same file keeps it as it is (its settings did not change). The .onion
// name fails its lookup without any DNS query (RFC 7686, Go's avoidDNS),
// so the test touches no network.
func TestH1ReloadZKHostUnresolvable(t *testing.T) {
	a := startBackend(t, "a", "127.0.0.1:0")
	dir := t.TempDir()
	path := writeConfig(t, dir, fmt.Sprintf("clusters: [{name: a, targets: [%s]}]\nroutes: [{cluster: a}]\n", a.Addr()))
	f, err := cluster.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.ServerConfig()
	cfg.Warmup = 200 * time.Millisecond
	var logs syncBuffer
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	reg := prometheus.NewRegistry()
	cfg.Metrics = reg
	r := runServer(t, cfg)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)

	const target = "zk://zk-not-there.onion:2181/services/echo"
	writeConfig(t, dir, fmt.Sprintf(`clusters:
  - {name: a, targets: [%s]}
  - {name: zk, targets: [%q]}
routes:
  - {match: {service: zk.v1.Registry}, cluster: zk}
  - {cluster: a}
`, a.Addr(), target))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if got, err := backendOf(ctx, client); err != nil || got != "a" {
		t.Errorf("call after the reload went to %q (%v), want a", got, err)
	}
	// Failures at about 0s, 1s and 3s if it tries again as documented.
	deadline := time.Now().Add(4 * time.Second)
	for time.Now().Before(deadline) && counterValue(t, reg, "streamlb_resolver_errors_total", "zk") < 2 {
		time.Sleep(50 * time.Millisecond)
	}
	n := counterValue(t, reg, "streamlb_resolver_errors_total", "zk")
	t.Logf("streamlb_resolver_errors_total{cluster=zk} = %v; warnings:\n%s", n, logs.String())
	if n < 2 {
		t.Errorf("the zk target failed %v times in 4s, want at least 2: after its first failure it is not tried again (README: lists again after a backoff of 1 s)", n)
	}
	if !strings.Contains(logs.String(), "zk-not-there.onion") {
		t.Errorf("no warning names the zk target that fails (README: logs a warning); logs:\n%s", logs.String())
	}
}

// fdCount returns the number of open file descriptors of the process, or
// -1 where /proc/self/fd cannot be read.
func fdCount() int {
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(es)
}

// stormConf is the file of reload gen of TestH1ReloadStorm: every few
// generations the retry policy changes (cluster x gets a new Upstream),
// the policy of x flips (rebuilt, same Upstream), the header route moves
// between x and y, and y leaves and comes back.
func stormConf(engine string, gen int, addrX, addrY string) string {
	policy := []string{"round_robin", "random", "least_request"}[gen%3]
	retries := 1 + (gen/5)%2
	to := "x"
	yc := fmt.Sprintf("  - {name: y, targets: [%s]}\n", addrY)
	switch gen % 4 {
	case 1:
		to = "y"
	case 3:
		yc = ""
	}
	return fmt.Sprintf(`engine: %s
drain_timeout: 60s
proxy: {max_retries: %d, retry_on: [grpc.testing.TestService/EmptyCall]}
clusters:
  - {name: x, targets: [%s], policy: %s}
%sroutes:
  - {match: {headers: [{name: x-route, exact: y}]}, cluster: %s}
  - {cluster: x}
`, engine, retries, addrX, policy, yc, to)
}

// TestH1ReloadStorm reloads the file 200 times, as fast as reloads go,
// while unary, server-streaming, client-streaming and bidi calls run on
// both routes, and long bidi calls span the whole storm. Every call must
// end OK; afterwards the goroutines, file descriptors and backend
// connections go back to what one configuration needs, and the metrics
// gather without error and name only the clusters of the last file.
// For both engines.
func TestH1ReloadStorm(t *testing.T) {
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) { testReloadStorm(t, engine) })
	}
}

func testReloadStorm(t *testing.T, engine string) {
	tsX, lnX := serveLive(t, "x")
	tsY, lnY := serveLive(t, "y")
	_ = tsX
	_ = tsY
	dir := t.TempDir()
	path := writeConfig(t, dir, stormConf(engine, 0, lnX.Addr().String(), lnY.Addr().String()))
	f, err := cluster.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.ServerConfig()
	reg := prometheus.NewRegistry()
	cfg.Metrics = reg
	r := runServer(t, cfg)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 90*time.Second)
	if _, err := backendOf(ctx, client); err != nil {
		t.Fatal(err)
	}
	if _, err := backendOf(ctx, client, "x-route", "y"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	baseG, baseFD := runtime.NumGoroutine(), fdCount()

	release := make(chan struct{})
	var long []*longCall
	for range 2 {
		long = append(long, startLongCall(ctx, client, release))
		long = append(long, startLongCall(ctx, client, release, "x-route", "y"))
	}
	for i, lc := range long {
		if err := <-lc.ready; err != nil {
			t.Fatalf("long call %d did not start: %v", i, err)
		}
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var calls, fails atomic.Int64
	var firstErr atomic.Value
	fail := func(kind string, err error) {
		fails.Add(1)
		firstErr.CompareAndSwap(nil, fmt.Sprintf("%s: %v", kind, err))
	}
	worker := func(kind string, md []string, call func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx := ctx
			if len(md) > 0 {
				cctx = metadata.AppendToOutgoingContext(ctx, md...)
			}
			for i := 0; i < 5000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				calls.Add(1)
				if err := call(cctx); err != nil {
					fail(kind, err)
				}
			}
		}()
	}
	unary := func(ctx context.Context) error {
		_, err := client.EmptyCall(metadata.AppendToOutgoingContext(ctx, testserver.MetadataDelay, "1ms"), &testgrpc.Empty{})
		return err
	}
	serverStream := func(ctx context.Context) error {
		var ps []*testgrpc.ResponseParameters
		for range 5 {
			ps = append(ps, &testgrpc.ResponseParameters{Size: 10, IntervalUs: 5000})
		}
		st, err := client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: ps})
		if err != nil {
			return err
		}
		n := 0
		for {
			_, err := st.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				return err
			}
			n++
		}
		if n != 5 {
			return fmt.Errorf("%d responses, want 5", n)
		}
		return nil
	}
	clientStream := func(ctx context.Context) error {
		st, err := client.StreamingInputCall(ctx)
		if err != nil {
			return err
		}
		for range 5 {
			if err := st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, 100)}}); err != nil {
				_, err = st.CloseAndRecv()
				return err
			}
			time.Sleep(3 * time.Millisecond)
		}
		resp, err := st.CloseAndRecv()
		if err != nil {
			return err
		}
		if resp.GetAggregatedPayloadSize() != 500 {
			return fmt.Errorf("aggregated %d bytes, want 500", resp.GetAggregatedPayloadSize())
		}
		return nil
	}
	bidi := func(ctx context.Context) error {
		st, err := client.FullDuplexCall(ctx)
		if err != nil {
			return err
		}
		for range 3 {
			if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}}); err != nil {
				_, err = st.Recv()
				return err
			}
			if _, err := st.Recv(); err != nil {
				return err
			}
		}
		if err := st.CloseSend(); err != nil {
			return err
		}
		if _, err := st.Recv(); err != io.EOF {
			return fmt.Errorf("after CloseSend: %v, want io.EOF", err)
		}
		return nil
	}
	for _, md := range [][]string{nil, {"x-route", "y"}} {
		worker("unary", md, unary)
		worker("unary", md, unary)
		worker("server-stream", md, serverStream)
		worker("client-stream", md, clientStream)
		worker("bidi", md, bidi)
	}

	// The admin endpoints are read all along: a scrape that races a
	// swap must answer, and -race must find nothing.
	var scrapes, badScrapes atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		paths := []string{"/metrics", "/backends", "/status.json", "/readyz", "/readyz?cluster=x"}
		for i := 0; i < 2000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			resp, err := http.Get(r.admin + paths[i%len(paths)])
			scrapes.Add(1)
			if err != nil {
				badScrapes.Add(1)
				continue
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				badScrapes.Add(1)
				firstErr.CompareAndSwap(nil, fmt.Sprintf("GET %s: %s", paths[i%len(paths)], resp.Status))
			}
		}
	}()

	const reloads = 200
	start := time.Now()
	for gen := 1; gen <= reloads && time.Since(start) < 40*time.Second; gen++ {
		writeConfig(t, dir, stormConf(engine, gen, lnX.Addr().String(), lnY.Addr().String()))
		if err := r.srv.Reload(ctx); err != nil {
			t.Fatalf("Reload %d: %v", gen, err)
		}
	}
	took := time.Since(start)
	close(stop)
	wg.Wait()
	close(release)
	for i, lc := range long {
		if err := <-lc.done; err != nil {
			fail(fmt.Sprintf("long call %d", i), err)
		}
	}
	t.Logf("%d reloads in %v; %d calls, %d failed", reloads, took, calls.Load(), fails.Load())
	if badScrapes.Load() != 0 {
		t.Errorf("%d of %d admin requests failed across the reload storm; first error: %v", badScrapes.Load(), scrapes.Load(), firstErr.Load())
	}
	if fails.Load() != 0 {
		t.Errorf("%d of %d calls failed across the reload storm, want 0; first: %v", fails.Load(), calls.Load(), firstErr.Load())
	}

	// The last file (gen 200: y present, the header route to x).
	var g, fds int
	var ox, oy int64
	deadline := time.Now().Add(10 * time.Second)
	for {
		g, fds, ox, oy = runtime.NumGoroutine(), fdCount(), lnX.open.Load(), lnY.open.Load()
		if g <= baseG+10 && fds <= baseFD+4 && ox <= 1 && oy <= 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("after: goroutines %d (before %d), fds %d (before %d), backend connections x %d, y %d (accepted x %d, y %d)",
		g, baseG, fds, baseFD, ox, oy, lnX.n.Load(), lnY.n.Load())
	if g > baseG+10 {
		t.Errorf("goroutines after the storm: %d, before it %d", g, baseG)
	}
	if baseFD >= 0 && fds > baseFD+4 {
		t.Errorf("file descriptors after the storm: %d, before it %d", fds, baseFD)
	}
	if ox > 1 || oy > 1 {
		t.Errorf("backend connections open after the storm: x %d, y %d; want at most 1 each", ox, oy)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Errorf("metrics after the storm: %v", err)
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "cluster" && l.GetValue() != "x" && l.GetValue() != "y" && l.GetValue() != "" {
					t.Errorf("series %s of cluster %q after the storm", mf.GetName(), l.GetValue())
				}
			}
		}
	}
}

// runServerStop runs a Server for cfg as runServer does and hands back
// Run's outcome and the function that starts its shutdown.
func runServerStop(t testing.TB, cfg cluster.ServerConfig) (running, <-chan error, func()) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quiet
	}
	srv, err := cluster.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	aln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- srv.Run(ctx, ln, aln) }()
	t.Cleanup(cancel)
	return running{srv: srv, addr: ln.Addr().String(), admin: "http://" + aln.Addr().String()}, ran, cancel
}
