package proxy_test

import (
	"context"
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

// TestConnBufferedBudget: a client whose streams' backends do not read
// (x-hang) can make the proxy hold at most MaxConnBufferedBytes plus one
// connection window of request buffers, counted by capacity, not
// StreamWindow per stream; a
// client on another connection is served meanwhile, and once those calls
// end the withheld window is given back and the connection works again.
func TestConnBufferedBudget(t *testing.T) {
	verifyNoLeaks(t)
	const budget = 1 << 20
	const connWindow = 65535
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.MaxConnBufferedBytes = budget
		c.ConnWindow = connWindow
		c.RetryBufferSize = -1 // replay is bounded elsewhere; count queued DATA only
	}, tscfg: func(_ int, c *testserver.Config) {
		// Static windows: with grpc-go's BDP estimation the backend's
		// transport could grow its windows and take in megabytes its
		// handlers never read, leaving the proxy little to hold (1 run in
		// 10-40 saw the count fall far below the budget).
		c.ServerOptions = append(c.ServerOptions, grpc.InitialWindowSize(1<<16), grpc.InitialConnWindowSize(1<<16))
	}})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	hangCtx, stopHang := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
	defer stopHang()
	const streams, msgs = 32, 64 // 32 × 64 × 32 KiB: 64 MiB offered
	payload := &testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, 32<<10)}}
	var wg sync.WaitGroup
	for range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := e.client.StreamingInputCall(hangCtx)
			if err != nil {
				return
			}
			for range msgs {
				if st.Send(payload) != nil {
					return // cancelled at the end
				}
			}
		}()
	}
	// Filled: past the budget, the connection withholds its window, and
	// stays so until it is down to half; what the backend takes in the
	// meantime can bring the count below the budget before a poll sees it
	// over (1 run in 10-40 timed out here).
	testkit.WaitFor(ctx, t, "the budget to fill", func() bool { return srv.MaxBufferedBytes() >= budget || srv.AnyWindowWithheld() })
	// While the senders push, held must stay within the bound.
	peak := int64(0)
	tick := time.NewTicker(5 * time.Millisecond)
	for range 100 {
		<-tick.C
		peak = max(peak, srv.MaxBufferedBytes())
	}
	tick.Stop()
	// Counted by capacity: past the budget at most one connection window
	// more arrives, and each stream may have started one more buffer.
	const bound = budget + connWindow + streams*16<<10
	t.Logf("buffered peak %d bytes (budget %d, bound %d; without it up to %d)", peak, budget, bound, streams*proxy.DefaultStreamWindow)
	if peak > bound {
		t.Errorf("buffered %d bytes, over the bound of %d", peak, bound)
	}
	other := testgrpc.NewTestServiceClient(e.dial(e.addr))
	if _, err := other.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 10}); err != nil {
		t.Errorf("client on another connection: %v", err)
	}
	stopHang()
	wg.Wait()
	testkit.WaitFor(ctx, t, "the held bytes to be released", func() bool { return srv.MaxHeldBytes() == 0 })
	// Every buffer counted was released: what is left is the request
	// headers of streams still open, none.
	testkit.WaitFor(ctx, t, "the buffer budget to be back to zero", func() bool { return srv.MaxBufferedBytes() == 0 })
	// The withheld window came back: a call with a body larger than one
	// connection window goes through on the same connection.
	if _, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: make([]byte, 256<<10)}}); err != nil {
		t.Errorf("call on the same connection after the hung calls ended: %v", err)
	}
}
