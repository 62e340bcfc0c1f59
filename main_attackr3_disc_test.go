package main

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// relayedCalls sums streamlb_call_duration_seconds_count on an admin
// address: the calls the proxy relayed to a backend.
func relayedCalls(t *testing.T, admin string) int {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	n := 0
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "streamlb_call_duration_seconds_count{") {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		n += int(v)
	}
	return n
}

// TestAttackR3ForwardingLoop: a proxy whose backend is itself (a static
// target or a DNS name pointing back at it, as 0.0.0.0 or its own IP), and
// two proxies that are each other's backend. Before, one call with a 10 s
// deadline went round the loop about 8,000 times (until every one of the
// 8 connections --max-backend-conns allows held 1,000 streams), added
// about 30 MiB of RSS, and failed after 0.3 s with "every connection is at
// its stream limit", which says nothing of a loop; with
// --max-backend-conns -1 it went round 37,000 times in its 1 s deadline,
// to 185 MiB of RSS. The grpc-proxy engine has no such limit: about 1,200
// hops a second, 264 MiB of RSS after a 1 s call. A loop must be found
// once a marked request passes a proxy the third time (a hairpin of two
// passes is allowed) and the call fail UNAVAILABLE naming the loop. Until
// its first mark a pass is marked with chance 1/16 (proxy.loopMark):
// about 19 relays in all, and more than 300 with a chance of 6e-9.
func TestAttackR3ForwardingLoop(t *testing.T) {
	ctx := testkit.Context(t, 60*time.Second)
	start := func(t *testing.T, listen, backend string, extra ...string) (string, string, *appRun) {
		app := startApp(ctx, t, append([]string{"proxy", "--listen", listen, "--backend", backend,
			"--admin-listen", "127.0.0.1:0", "--release-startup-pages=false", "--log-format", "json"}, extra...),
			"listening", "admin listening")
		got := app.wait(ctx, t)
		return got["listening"].Addr, got["admin listening"].Addr, app
	}
	call := func(t *testing.T, addr string, timeout time.Duration) error {
		cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		cctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		_, err = testgrpc.NewTestServiceClient(cc).EmptyCall(cctx, &testgrpc.Empty{})
		return err
	}
	check := func(t *testing.T, err error, took time.Duration, hops int) {
		t.Helper()
		t.Logf("the call took %v and %d relayed calls: %v", took.Round(time.Millisecond), hops, err)
		if s := status.Convert(err); s.Code() != codes.Unavailable || !strings.Contains(s.Message(), "loop") {
			t.Errorf("call = %v, want UNAVAILABLE naming the loop", err)
		}
		// Each proxy lets a marked request pass 3 times
		// (proxy.maxLoopPasses): a hairpin through one proxy is no loop.
		if hops > 300 {
			t.Errorf("the call was relayed %d times, want the loop found by its third marked pass through a proxy", hops)
		}
	}
	t.Run("itself", func(t *testing.T) {
		const addr = "127.0.0.1:26811"
		_, admin, app := start(t, addr, addr)
		t.Cleanup(func() { app.shutdown(t) })
		st := time.Now()
		err := call(t, addr, 10*time.Second)
		check(t, err, time.Since(st), relayedCalls(t, admin))
	})
	t.Run("two proxies", func(t *testing.T) {
		const a, b = "127.0.0.1:26812", "127.0.0.1:26813"
		_, adminA, appA := start(t, a, b)
		t.Cleanup(func() { appA.shutdown(t) })
		_, adminB, appB := start(t, b, a)
		t.Cleanup(func() { appB.shutdown(t) })
		st := time.Now()
		err := call(t, a, 10*time.Second)
		check(t, err, time.Since(st), relayedCalls(t, adminA)+relayedCalls(t, adminB))
	})
	t.Run("grpc-proxy engine", func(t *testing.T) {
		// Only 1 s: this engine went round about 1,200 times a second, at
		// about 200 KiB of RSS each (264 MiB after 1 s), with no limit.
		const addr = "127.0.0.1:26814"
		_, admin, app := start(t, addr, addr, "--engine", "grpc-proxy")
		t.Cleanup(func() { app.shutdown(t) })
		st := time.Now()
		err := call(t, addr, time.Second)
		check(t, err, time.Since(st), relayedCalls(t, admin))
	})
}

// TestAttackR3DNSFlipUnderLoad: a DNS name whose single A record flips
// between two pods every 120 ms (40 flips), followed with a 100 ms
// refresh, while 4 clients call a method that takes 150 ms: every flip
// removes the pod that holds calls in flight, which must finish on it
// (drained, not cut), and no call may fail. At the end the proxy holds no
// more backend connections than the two pods need.
func TestAttackR3DNSFlipUnderLoad(t *testing.T) {
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })
	quiet := slog.New(slog.DiscardHandler)
	ctx := testkit.Context(t, 60*time.Second)
	dnsSrv := testserver.NewDNSServer(testserver.DNSConfig{DefaultTTL: 1, Logger: quiet})
	if err := dnsSrv.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dnsSrv.Stop)
	const name = "flip.test.svc"
	port := ""
	var pods []*testserver.Server
	for i := range 2 {
		ts, err := testserver.New(testserver.Config{Name: fmt.Sprintf("pod-%d", i), Latency: 150 * time.Millisecond, Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		if err := ts.Start(fmt.Sprintf("127.0.0.%d:%s", 41+i, cmpOr(port, "0"))); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ts.Stop)
		_, port, _ = net.SplitHostPort(ts.Addr())
		pods = append(pods, ts)
	}
	dnsSrv.SetA(name, "127.0.0.41")
	app := startApp(ctx, t, []string{"proxy", "--listen", "127.0.0.1:0",
		"--backend", fmt.Sprintf("dns://%s/%s:%s", dnsSrv.Addr(), name, port),
		"--dns-refresh", "100ms", "--admin-listen", "127.0.0.1:0", "--release-startup-pages=false",
		"--drain-timeout", "5s", "--log-format", "json"}, "listening", "admin listening")
	got := app.wait(ctx, t)
	t.Cleanup(func() { app.shutdown(t) })
	proxyAddr, admin := got["listening"].Addr, got["admin listening"].Addr

	cc, err := grpc.NewClient("passthrough:///"+proxyAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	client := testgrpc.NewTestServiceClient(cc)
	var calls, failed atomic.Int64
	var firstErr atomic.Value
	loadCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for i := 0; i < 1000 && loadCtx.Err() == nil; i++ {
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := client.EmptyCall(cctx, &testgrpc.Empty{})
				cancel()
				calls.Add(1)
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		})
	}
	tick := time.NewTicker(120 * time.Millisecond)
	for i := range 40 {
		<-tick.C
		dnsSrv.SetA(name, fmt.Sprintf("127.0.0.%d", 41+(i+1)%2))
	}
	tick.Stop()
	stop()
	wg.Wait()
	t.Logf("%d calls, %d failed (first: %v); pod calls %d and %d", calls.Load(), failed.Load(), firstErr.Load(), pods[0].Calls(), pods[1].Calls())
	if failed.Load() > 0 {
		t.Errorf("%d of %d calls failed while the record flipped; first: %v", failed.Load(), calls.Load(), firstErr.Load())
	}
	if pods[0].Calls() == 0 || pods[1].Calls() == 0 {
		t.Errorf("pod calls %d and %d, want both pods used", pods[0].Calls(), pods[1].Calls())
	}
	// The gauge has no series while no backend connection is open.
	conns := 0.0
	for _, line := range strings.Split(httpBody(t, "http://"+admin+"/metrics"), "\n") {
		if strings.HasPrefix(line, "streamlb_backend_connections{") {
			n, _ := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
			conns += n
		}
	}
	t.Logf("%v backend connections open after the flips", conns)
	if conns > 4 {
		t.Errorf("%v backend connections after the flips, want at most 4", conns)
	}
}
