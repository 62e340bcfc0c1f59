package proxy_test

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// stuckWarnHandler is a slog handler whose Warn and Error records block
// until release is closed, as a write to a stderr pipe nobody reads does;
// entered is closed when the first one starts.
type stuckWarnHandler struct {
	entered, release chan struct{}
	once             *sync.Once
}

func (h stuckWarnHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (h stuckWarnHandler) Handle(context.Context, slog.Record) error {
	h.once.Do(func() { close(h.entered) })
	<-h.release
	return nil
}
func (h stuckWarnHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h stuckWarnHandler) WithGroup(string) slog.Handler      { return h }

// TestBackendConnCapLoggerBlocks: the Warn of a call refused at
// MaxBackendConns is logged after the backend pool's lock is released, so
// a logger that blocks holds up that call alone: a call to another
// backend, on another client connection, goes through meanwhile. (The
// proxy command's logger does not block, see cluster.LogWriter; this is
// the defence in depth.)
func TestBackendConnCapLoggerBlocks(t *testing.T) {
	verifyNoLeaks(t)
	h := stuckWarnHandler{entered: make(chan struct{}), release: make(chan struct{}), once: new(sync.Once)}
	e := newEnv(t, envOpts{backends: 2, tscfg: func(i int, c *testserver.Config) {
		if i == 0 {
			c.ServerOptions = append(c.ServerOptions, grpc.MaxConcurrentStreams(2))
		}
	}, pcfg: func(c *proxy.Config) { c.MaxBackendConns = 1; c.MaxBackendPending = -1; c.Logger = slog.New(h) }})
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(h.release) }) }
	t.Cleanup(unblock) // before the env's teardown, which waits for the proxy
	capped, other := e.backends[0], e.backends[1]
	ctx := testkit.Context(t, 30*time.Second)
	e.setBackends(capped.Addr())
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil { // learns its SETTINGS
		t.Fatal(err)
	}
	hang, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for range 2 {
		wg.Add(1)
		go func() { defer wg.Done(); e.client.EmptyCall(hang, &testgrpc.Empty{}) }()
	}
	testkit.WaitFor(ctx, t, "the capped backend's one connection full", func() bool { return capped.InFlight() == 2 })

	// A third call, on a connection of its own, is refused at the cap;
	// its Warn blocks.
	refused := testgrpc.NewTestServiceClient(e.dial(e.addr))
	wg.Add(1)
	go func() { defer wg.Done(); refused.EmptyCall(hang, &testgrpc.Empty{}) }()
	select {
	case <-h.entered:
	case <-ctx.Done():
		t.Fatal("the refusal at MaxBackendConns was not logged")
	}

	// Meanwhile, a call to the other backend on a third connection.
	e.setBackends(other.Addr())
	cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
	_, err := testgrpc.NewTestServiceClient(e.dial(e.addr)).EmptyCall(cctx, &testgrpc.Empty{})
	ccancel()
	if err != nil {
		t.Errorf("call to another backend while a Warn was blocked: %v", err)
	}
	unblock()
}
