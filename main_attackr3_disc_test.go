package main

import (
	"bufio"
	"context"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
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
// to 185 MiB of RSS. A loop must be found at the first repeated hop and
// the call fail UNAVAILABLE naming the loop.
func TestAttackR3ForwardingLoop(t *testing.T) {
	ctx := testkit.Context(t, 60*time.Second)
	start := func(t *testing.T, listen, backend string) (string, string, *appRun) {
		app := startApp(ctx, t, []string{"proxy", "--listen", listen, "--backend", backend,
			"--admin-listen", "127.0.0.1:0", "--release-startup-pages=false", "--log-format", "json"},
			"listening", "admin listening")
		got := app.wait(ctx, t)
		return got["listening"].Addr, got["admin listening"].Addr, app
	}
	call := func(t *testing.T, addr string) error {
		cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
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
		if hops > 4 {
			t.Errorf("the call was relayed %d times, want the loop found at the first repeated hop", hops)
		}
	}
	t.Run("itself", func(t *testing.T) {
		const addr = "127.0.0.1:26811"
		_, admin, app := start(t, addr, addr)
		t.Cleanup(func() { app.shutdown(t) })
		st := time.Now()
		err := call(t, addr)
		check(t, err, time.Since(st), relayedCalls(t, admin))
	})
	t.Run("two proxies", func(t *testing.T) {
		const a, b = "127.0.0.1:26812", "127.0.0.1:26813"
		_, adminA, appA := start(t, a, b)
		t.Cleanup(func() { appA.shutdown(t) })
		_, adminB, appB := start(t, b, a)
		t.Cleanup(func() { appB.shutdown(t) })
		st := time.Now()
		err := call(t, a)
		check(t, err, time.Since(st), relayedCalls(t, adminA)+relayedCalls(t, adminB))
	})
}

