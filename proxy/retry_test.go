package proxy_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

const emptyCall = "/grpc.testing.TestService/EmptyCall"

// TestTransparentRetryRefused: a backend that refuses connections costs
// the client nothing; every call is retried on a live backend.
func TestTransparentRetryRefused(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2, dcfg: func(c *director.Config) { c.EjectAfter = -1 }})
	e.setBackends(testkit.DeadAddr(t), e.backends[0].Addr(), e.backends[1].Addr())
	ctx := testkit.Context(t, 20*time.Second)
	for i := range 30 {
		if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("call %d: %v (a refused connection must be retried elsewhere)", i, err)
		}
	}
	if got := e.backends[0].Calls() + e.backends[1].Calls(); got != 30 {
		t.Errorf("backends served %d calls, want 30", got)
	}
}

// TestRetryUnavailable: a method that opted in is retried when a backend
// answers UNAVAILABLE; one that did not is not.
func TestRetryUnavailable(t *testing.T) {
	for _, tc := range []struct {
		name      string
		retryOn   []string
		wantFails bool
	}{
		{name: "opted in", retryOn: []string{"/grpc.testing.TestService/"}},
		{name: "not opted in", wantFails: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{backends: 2,
				tscfg: func(i int, c *testserver.Config) {
					if i == 0 {
						c.ErrorRate = 1 // b0 answers every call with UNAVAILABLE
					}
				},
				pcfg: func(c *proxy.Config) { c.RetryOn = tc.retryOn },
				dcfg: func(c *director.Config) { c.EjectAfter = -1 },
			})
			ctx := testkit.Context(t, 20*time.Second)
			fails := 0
			for range 20 {
				var hdr metadata.MD
				_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}, grpc.Header(&hdr))
				if err != nil {
					if status.Code(err) != codes.Unavailable {
						t.Fatalf("got %v, want success or UNAVAILABLE", err)
					}
					fails++
					continue
				}
				if name := testserver.BackendFromHeader(hdr); name != "b1" {
					t.Errorf("success attributed to %q, want b1 (the retry's backend)", name)
				}
			}
			if e.backends[0].Calls() == 0 {
				t.Fatal("the failing backend got no calls; the test proves nothing")
			}
			if tc.wantFails != (fails > 0) {
				t.Errorf("%d of 20 calls failed; want failures: %v", fails, tc.wantFails)
			}
		})
	}
}

// TestRetryBudget: when every backend fails, the budget stops retries so
// load does not multiply.
func TestRetryBudget(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 3,
		tscfg: func(_ int, c *testserver.Config) { c.ErrorRate = 1 },
		pcfg:  func(c *proxy.Config) { c.RetryOn = []string{emptyCall} },
		dcfg:  func(c *director.Config) { c.EjectAfter = -1 },
	})
	ctx := testkit.Context(t, 20*time.Second)
	const calls = 100
	for range calls {
		if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); status.Code(err) != codes.Unavailable {
			t.Fatalf("got %v, want UNAVAILABLE from backends that all fail", err)
		}
	}
	var served int64
	for _, b := range e.backends {
		served += b.Calls()
	}
	extra := float64(served-calls) / calls * 100
	t.Logf("%d calls cost %d backend calls (%.0f%% extra)", calls, served, extra)
	if served <= calls {
		t.Errorf("no retry was made at all (%d backend calls)", served)
	}
	if extra > 20 {
		t.Errorf("retries added %.0f%% load, want at most 20%%", extra)
	}
}

// TestRetryBudgetSetting: the budget's size is a setting (a larger bucket
// allows more retries before it throttles), and throttling is logged, once
// per interval rather than per call.
func TestRetryBudgetSetting(t *testing.T) {
	verifyNoLeaks(t)
	for _, tc := range []struct {
		budget int
		// Retries allowed before the bucket is half empty: every failed
		// attempt takes a token, a retry's included, so about the
		// bucket's size.
		minRetries, maxRetries int64
	}{
		{budget: 10, minRetries: 5, maxRetries: 15},
		{budget: 100, minRetries: 50, maxRetries: 150},
	} {
		t.Run(fmt.Sprint("budget=", tc.budget), func(t *testing.T) {
			var logs syncLog
			e := newEnv(t, envOpts{backends: 3,
				tscfg: func(_ int, c *testserver.Config) { c.ErrorRate = 1 },
				pcfg: func(c *proxy.Config) {
					c.RetryOn = []string{emptyCall}
					c.RetryBudget = tc.budget
					c.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
				},
				dcfg: func(c *director.Config) { c.EjectAfter = -1 },
			})
			ctx := testkit.Context(t, 20*time.Second)
			const calls = 200
			for range calls {
				if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); status.Code(err) != codes.Unavailable {
					t.Fatalf("got %v, want UNAVAILABLE from backends that all fail", err)
				}
			}
			var served int64
			for _, b := range e.backends {
				served += b.Calls()
			}
			retries := served - calls
			t.Logf("budget %d: %d calls cost %d retries", tc.budget, calls, retries)
			if retries < tc.minRetries || retries > tc.maxRetries {
				t.Errorf("budget %d: %d retries, want %d..%d", tc.budget, retries, tc.minRetries, tc.maxRetries)
			}
			if n := strings.Count(logs.String(), "retry budget exhausted"); n != 1 {
				t.Errorf("throttling logged %d times, want once:\n%s", n, logs.String())
			}
		})
	}
}

// syncLog is a strings.Builder safe for a logger's concurrent writes.
type syncLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *syncLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestKilledUnderLoad: a backend killed while calls run on it is ejected
// and, with retries, the client sees no failed call.
func TestKilledUnderLoad(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 3, pcfg: func(c *proxy.Config) { c.RetryOn = []string{emptyCall} }})
	ctx := testkit.Context(t, 30*time.Second)
	slow := metadata.AppendToOutgoingContext(ctx, testserver.MetadataDelay, "5ms")
	victim := e.backends[2]
	var done atomic.Int64
	var g errgroup.Group
	for range 8 {
		g.Go(func() error {
			for range 150 {
				if _, err := e.client.EmptyCall(slow, &testgrpc.Empty{}); err != nil {
					return err
				}
				done.Add(1)
			}
			return nil
		})
	}
	testkit.WaitFor(ctx, t, "load on the victim", func() bool { return victim.Calls() > 20 })
	victim.Stop()
	if err := g.Wait(); err != nil {
		t.Fatalf("a call failed although the proxy could retry it: %v", err)
	}
	stats := e.dir.Backends()
	for _, b := range stats {
		if b.Addr == victim.Addr() && !b.Ejected {
			t.Errorf("killed backend not ejected: %+v", b)
		}
	}
	if got := done.Load(); got != 8*150 {
		t.Errorf("%d calls completed, want %d", got, 8*150)
	}
}

var _ = context.Background

// TestRetriedFailureMatchesDirect: when every attempt of a retried call
// fails, the client gets the last backend's answer as that backend sent
// it, headers held back for the retry included.
func TestRetriedFailureMatchesDirect(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1,
		tscfg: func(_ int, c *testserver.Config) { c.ErrorRate = 1 },
		pcfg:  func(c *proxy.Config) { c.RetryOn = []string{emptyCall} },
		dcfg:  func(c *director.Config) { c.EjectAfter = -1 },
	})
	ctx := metadata.AppendToOutgoingContext(testkit.Context(t, 20*time.Second), "x-echo-a", "1", "x-echo-trailer-b", "2")
	call := func(c testgrpc.TestServiceClient) callResult {
		var h, tr metadata.MD
		_, err := c.EmptyCall(ctx, &testgrpc.Empty{}, grpc.Header(&h), grpc.Trailer(&tr))
		return observe(h, tr, err)
	}
	want := call(e.direct(0))
	before := e.backends[0].Calls()
	got := call(e.client)
	if want.code != codes.Unavailable {
		t.Fatalf("direct call: %+v, want UNAVAILABLE", want)
	}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(callResult{})); diff != "" {
		t.Errorf("retried failure differs from a direct call (-direct +proxied):\n%s", diff)
	}
	if n := e.backends[0].Calls() - before; n != 3 {
		t.Errorf("backend saw %d attempts, want 3 (1 + 2 retries)", n)
	}
}
