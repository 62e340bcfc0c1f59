package resolver

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/miekg/dns"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	grpcresolver "google.golang.org/grpc/resolver"

	"github.com/streamlb/streamlb/testserver"
)

// startPod starts a testserver named name on ip:port, stopped at cleanup.
func startPod(t *testing.T, name, ip string, port int) *testserver.Server {
	t.Helper()
	s, err := testserver.New(testserver.Config{Name: name, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(net.JoinHostPort(ip, strconv.Itoa(port))); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// freePort returns a TCP port free on 127.0.0.1..127.0.0.n, like pods of a
// headless service that all listen on the same port.
func freePort(t *testing.T, n int) int {
	t.Helper()
	for range 10 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		lns := []net.Listener{ln}
		ok := true
		for i := 2; i <= n && ok; i++ {
			l, err := net.Listen("tcp", net.JoinHostPort("127.0.0."+strconv.Itoa(i), strconv.Itoa(port)))
			if err != nil {
				ok = false
				break
			}
			lns = append(lns, l)
		}
		for _, l := range lns {
			l.Close()
		}
		if ok {
			return port
		}
	}
	t.Fatal("no port free on all loopback addresses")
	return 0
}

// callBackends makes n UnaryCalls and returns the backend of each.
func callBackends(ctx context.Context, t *testing.T, c testgrpc.TestServiceClient, n int) []string {
	t.Helper()
	var got []string
	for range n {
		var hdr metadata.MD
		if _, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.Header(&hdr)); err != nil {
			t.Fatalf("UnaryCall: %v", err)
		}
		got = append(got, testserver.BackendFromHeader(hdr))
	}
	return got
}

// waitRoundRobin polls, as grpc-go's roundrobin.CheckRoundRobinRPCs does,
// until a window of calls goes to exactly want, each backend the same
// number of times.
func waitRoundRobin(ctx context.Context, t *testing.T, c testgrpc.TestServiceClient, want ...string) {
	t.Helper()
	slices.Sort(want)
	for {
		got := callBackends(ctx, t, c, 3*len(want))
		counts := map[string]int{}
		for _, b := range got {
			counts[b]++
		}
		even := len(counts) == len(want)
		for _, b := range want {
			even = even && counts[b] == 3
		}
		if even {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("calls never spread evenly over %v; last window: %v", want, got)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func TestBuilderFollowsScaleOut(t *testing.T) {
	t.Parallel()
	port := freePort(t, 4)
	dnsSrv := startDNSServer(t, testserver.DNSConfig{})
	for i := 1; i <= 3; i++ {
		startPod(t, fmt.Sprintf("pod-%d", i), fmt.Sprintf("127.0.0.%d", i), port)
	}
	dnsSrv.SetA("web.default.svc.cluster.local", "127.0.0.1", "127.0.0.2", "127.0.0.3")

	b := NewBuilder(DNSOptions{Refresh: fastRefresh, Logger: slog.New(slog.DiscardHandler)})
	if b.Scheme() != GRPCScheme {
		t.Errorf("Scheme() = %q, want %q", b.Scheme(), GRPCScheme)
	}
	target := fmt.Sprintf("%s://%s/web.default.svc.cluster.local:%d", GRPCScheme, dnsSrv.Addr(), port)
	cc, err := grpc.NewClient(target,
		grpc.WithResolvers(b),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	client := testgrpc.NewTestServiceClient(cc)
	ctx := testContext(t)

	waitRoundRobin(ctx, t, client, "pod-1", "pod-2", "pod-3")

	// Scale out: a fourth pod appears in DNS and starts getting calls,
	// though no connection broke.
	startPod(t, "pod-4", "127.0.0.4", port)
	dnsSrv.SetA("web.default.svc.cluster.local", "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
	waitRoundRobin(ctx, t, client, "pod-1", "pod-2", "pod-3", "pod-4")

	// Scale in: pod-1 leaves DNS (it still runs, so any call it gets
	// would show a stale set).
	dnsSrv.SetA("web.default.svc.cluster.local", "127.0.0.2", "127.0.0.3", "127.0.0.4")
	waitRoundRobin(ctx, t, client, "pod-2", "pod-3", "pod-4")

	// A DNS outage leaves the channel's addresses alone.
	dnsSrv.SetDown(true)
	q := dnsSrv.Queries()
	waitDNSQueries(ctx, t, dnsSrv, q+4)
	waitRoundRobin(ctx, t, client, "pod-2", "pod-3", "pod-4")
}

// waitDNSQueries waits until s has received at least n queries.
func waitDNSQueries(ctx context.Context, t *testing.T, s *testserver.DNSServer, n int64) {
	t.Helper()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for s.Queries() < n {
		select {
		case <-ctx.Done():
			t.Fatalf("DNS server got %d queries, want %d", s.Queries(), n)
		case <-tick.C:
		}
	}
}

// fakeClientConn is a grpc-go resolver.ClientConn that records updates.
type fakeClientConn struct {
	grpcresolver.ClientConn // panics on methods not overridden
	u                       *recUpdater
}

func (f *fakeClientConn) UpdateState(s grpcresolver.State) error {
	var st State
	for _, a := range s.Addresses {
		st.Addresses = append(st.Addresses, Address{Addr: a.Addr})
	}
	return f.u.UpdateState(st)
}

func (f *fakeClientConn) ReportError(err error) { f.u.ReportError(err) }

func TestBuilderBuild(t *testing.T) {
	t.Parallel()
	dnsSrv := startDNSServer(t, testserver.DNSConfig{})
	dnsSrv.SetA("svc", "10.0.0.1")
	b := NewBuilder(DNSOptions{Refresh: fastRefresh, MinResolveNowInterval: time.Millisecond, Logger: slog.New(slog.DiscardHandler)})

	tests := []struct {
		name    string
		target  string
		wantErr bool
	}{
		{name: "server", target: GRPCScheme + "://" + dnsSrv.Addr() + "/svc:80"},
		{name: "missing port", target: GRPCScheme + "://" + dnsSrv.Addr() + "/svc", wantErr: true},
		{name: "bad server", target: GRPCScheme + "://nope/svc:80", wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			u := newRecUpdater()
			r, err := b.Build(grpcTarget(t, tc.target), &fakeClientConn{u: u}, grpcresolver.BuildOptions{})
			if tc.wantErr {
				if err == nil {
					r.Close()
					t.Fatal("Build succeeded, want an error")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			ctx := testContext(t)
			u.waitSet(ctx, t, "10.0.0.1:80")
			dnsSrv.SetA("svc", "10.0.0.1", "10.0.0.2")
			r.ResolveNow(grpcresolver.ResolveNowOptions{})
			u.waitSet(ctx, t, "10.0.0.1:80", "10.0.0.2:80")
			dnsSrv.SetFailure(dns.RcodeServerFailure)
			u.waitFor(ctx, t, "an error", func() bool { _, errs := u.snapshot(); return len(errs) > 0 })
			dnsSrv.SetFailure(0)
			r.Close()                                      // waits for the refresh loop; goleak checks it is gone
			r.ResolveNow(grpcresolver.ResolveNowOptions{}) // harmless after Close
		})
	}
}

func grpcTarget(t *testing.T, s string) grpcresolver.Target {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return grpcresolver.Target{URL: *u}
}
