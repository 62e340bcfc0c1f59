package proxy_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestBackendConcurrencyLimit: a backend advertising
// SETTINGS_MAX_CONCURRENT_STREAMS=10 still gets 30 concurrent calls, over
// more connections, none queued without bound.
func TestBackendConcurrencyLimit(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, tscfg: func(_ int, c *testserver.Config) {
		c.ServerOptions = append(c.ServerOptions, grpc.MaxConcurrentStreams(10))
	}})
	ctx := testkit.Context(t, 20*time.Second)
	// A first call learns the backend's SETTINGS.
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	hang, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
	var g errgroup.Group
	for range 30 {
		g.Go(func() error {
			_, err := e.client.EmptyCall(hang, &testgrpc.Empty{})
			if status.Code(err) != codes.Canceled {
				return err
			}
			return nil
		})
	}
	testkit.WaitFor(ctx, t, "30 calls in flight on a backend limited to 10 streams per connection", func() bool {
		return e.backends[0].InFlight() == 30
	})
	cancel()
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
}

// TestDrainRemovedBackend removes a backend from the set under load: its
// calls in flight finish, new calls go elsewhere, and none fails.
func TestDrainRemovedBackend(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 3})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	slow := metadata.AppendToOutgoingContext(ctx, testserver.MetadataDelay, "20ms")

	var failed atomic.Int64
	stop := make(chan struct{})
	var g errgroup.Group
	for range 10 {
		g.Go(func() error {
			for i := 0; i < 2000; i++ {
				select {
				case <-stop:
					return nil
				default:
				}
				if _, err := e.client.EmptyCall(slow, &testgrpc.Empty{}); err != nil {
					failed.Add(1)
					return err
				}
			}
			return nil
		})
	}
	testkit.WaitFor(ctx, t, "load on every backend", func() bool {
		return e.backends[0].Calls() > 5 && e.backends[1].Calls() > 5 && e.backends[2].Calls() > 5
	})
	gone := e.backends[2]
	keep := []string{e.backends[0].Addr(), e.backends[1].Addr()}
	e.setBackends(keep...)
	srv.RetainBackends(keep)
	testkit.WaitFor(ctx, t, "the removed backend to finish its calls", func() bool { return gone.InFlight() == 0 })
	before := gone.Calls()
	// More load after the removal: none of it may reach the removed backend.
	target := e.backends[0].Calls() + 20
	testkit.WaitFor(ctx, t, "more calls after the removal", func() bool { return e.backends[0].Calls() > target })
	close(stop)
	if err := g.Wait(); err != nil {
		t.Fatalf("a call failed while the set changed: %v", err)
	}
	if after := gone.Calls(); after != before {
		t.Errorf("removed backend got %d calls after it drained", after-before)
	}
	// Its connection closed once idle, so stopping it now disturbs nothing.
	gone.Stop()
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrencyCaps(t *testing.T) {
	cases := []struct {
		name string
		cfg  func(*proxy.Config)
	}{
		{name: "total", cfg: func(c *proxy.Config) { c.MaxStreams = 5 }},
		{name: "per backend", cfg: func(c *proxy.Config) { c.MaxStreamsPerBackend = 5 }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{backends: 1, pcfg: tc.cfg})
			ctx := testkit.Context(t, 20*time.Second)
			hang, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
			var g errgroup.Group
			for range 5 {
				g.Go(func() error {
					_, err := e.client.EmptyCall(hang, &testgrpc.Empty{})
					if status.Code(err) != codes.Canceled {
						return err
					}
					return nil
				})
			}
			testkit.WaitFor(ctx, t, "5 calls in flight", func() bool { return e.backends[0].InFlight() == 5 })
			_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{})
			if st := status.Convert(err); st.Code() != codes.ResourceExhausted || !strings.Contains(st.Message(), "limit 5") {
				t.Errorf("call over the cap: %v, want RESOURCE_EXHAUSTED naming the limit", err)
			}
			cancel()
			if err := g.Wait(); err != nil {
				t.Fatal(err)
			}
			// The budget is released: calls succeed again.
			if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Errorf("call after the others ended: %v", err)
			}
		})
	}
}

// TestPickMetadata checks the configured headers reach the Picker.
func TestPickMetadata(t *testing.T) {
	verifyNoLeaks(t)
	got := make(chan []string, 1)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		inner := c.Picker
		c.PickMetadata = []string{"X-User"}
		c.Picker = proxy.PickerFunc(func(ctx context.Context, m string) (string, func(error), error) {
			md, _ := metadata.FromIncomingContext(ctx)
			got <- md.Get("x-user")
			return inner.Pick(ctx, m)
		})
	}})
	ctx := testkit.Context(t, 20*time.Second)
	if _, err := e.client.EmptyCall(metadata.AppendToOutgoingContext(ctx, "x-user", "alice", "x-other", "no"), &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	if v := <-got; len(v) != 1 || v[0] != "alice" {
		t.Errorf("picker saw x-user %v, want [alice]", v)
	}
}
