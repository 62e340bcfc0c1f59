package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/testserver"
)

// TestProxyFollowsDNS runs `streamlb proxy` on a DNS name served by a real
// DNS server, with one client connection under steady load, while the
// records change: a new pod gets calls within the refresh interval plus a
// second, a removed pod is drained and then stopped, and no call fails.
func TestProxyFollowsDNS(t *testing.T) {
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })
	quiet := slog.New(slog.DiscardHandler)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	dns := testserver.NewDNSServer(testserver.DNSConfig{DefaultTTL: 1, Logger: quiet})
	if err := dns.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	defer dns.Stop()
	const name = "grpc-echo.test.svc.cluster.local"
	var pods []*testserver.Server
	port := ""
	for i := range 4 {
		ts, err := testserver.New(testserver.Config{Name: fmt.Sprintf("pod-%d", i+1), Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		if err := ts.Start(fmt.Sprintf("127.0.0.%d:%s", 31+i, cmpOr(port, "0"))); err != nil {
			t.Fatal(err)
		}
		defer ts.Stop()
		_, port, _ = net.SplitHostPort(ts.Addr())
		pods = append(pods, ts)
	}
	publish := func(ids ...int) {
		var ips []string
		for _, i := range ids {
			ips = append(ips, fmt.Sprintf("127.0.0.%d", 31+i))
		}
		dns.SetA(name, ips...)
	}
	publish(0, 1, 2)

	const refresh = 300 * time.Millisecond
	app := startApp(ctx, t, []string{"proxy", "--listen", "127.0.0.1:0",
		"--backend", fmt.Sprintf("dns://%s/%s:%s", dns.Addr(), name, port),
		"--dns-refresh", refresh.String(), "--admin-listen", "127.0.0.1:0",
		"--drain-timeout", "5s", "--log-format", "json"}, "listening", "admin listening")
	got := app.wait(ctx, t)
	proxyAddr, adminAddr := got["listening"].Addr, got["admin listening"].Addr

	if code := httpGet(t, "http://"+adminAddr+"/readyz"); code != http.StatusOK {
		t.Errorf("/readyz = %d, want 200", code)
	}

	cc, err := grpc.NewClient("passthrough:///"+proxyAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	client := testgrpc.NewTestServiceClient(cc)
	var mu sync.Mutex
	var failures []error
	seen := map[string]time.Time{}    // pod → when its last call ended
	started := map[string]time.Time{} // pod → when its last call started
	loadCtx, stopLoad := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 100000 && loadCtx.Err() == nil; i++ {
				var hdr metadata.MD
				start := time.Now()
				_, err := client.EmptyCall(ctx, &testgrpc.Empty{}, grpc.Header(&hdr))
				mu.Lock()
				if err != nil {
					failures = append(failures, err)
				} else {
					pod := testserver.BackendFromHeader(hdr)
					seen[pod] = time.Now()
					if start.After(started[pod]) {
						started[pod] = start
					}
				}
				mu.Unlock()
			}
		}()
	}
	lastSeen := func(pod string) time.Time {
		mu.Lock()
		defer mu.Unlock()
		return seen[pod]
	}
	waitUntil := func(what string, cond func() bool) {
		t.Helper()
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for !cond() {
			select {
			case <-ctx.Done():
				t.Fatalf("timed out waiting for %s", what)
			case <-tick.C:
			}
		}
	}
	waitUntil("calls on the first three pods", func() bool {
		return !lastSeen("pod-1").IsZero() && !lastSeen("pod-2").IsZero() && !lastSeen("pod-3").IsZero()
	})

	// Scale out: the new pod gets calls within refresh + 1s.
	changed := time.Now()
	publish(0, 1, 2, 3)
	waitUntil("calls on the new pod", func() bool { return lastSeen("pod-4").After(changed) })
	if d := lastSeen("pod-4").Sub(changed); d > refresh+time.Second {
		t.Errorf("the new pod got its first call %v after the records changed, want within %v", d, refresh+time.Second)
	} else {
		t.Logf("new pod got calls %v after the records changed (refresh %v)", d.Round(time.Millisecond), refresh)
	}

	// Scale in: pod-1 leaves the records, is drained, then stopped.
	publish(1, 2, 3)
	waitUntil("the proxy to drop pod-1", func() bool {
		return !strings.Contains(httpBody(t, "http://"+adminAddr+"/backends"), pods[0].Addr())
	})
	waitUntil("pod-1 to finish its calls", func() bool { return pods[0].InFlight() == 0 })
	sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
	pods[0].Shutdown(sctx)
	scancel()
	removed := time.Now()
	after := pods[3].Calls() + 200
	waitUntil("more calls after the removal", func() bool { return pods[3].Calls() > after })
	stopLoad()
	wg.Wait()
	cc.Close()
	mu.Lock()
	if last := started["pod-1"]; last.After(removed) {
		t.Errorf("a call started %v after pod-1 was stopped was served by it", last.Sub(removed))
	}
	if len(failures) > 0 {
		t.Errorf("%d calls failed while the records changed; first: %v", len(failures), failures[0])
	}
	mu.Unlock()

	if err := app.shutdown(t); err != nil {
		t.Errorf("proxy returned %v after its context was cancelled, want nil", err)
	}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func httpGet(t *testing.T, url string) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func httpBody(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}
