package proxy_test

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestH2llManyStreamsCancelled: 300 bidi streams on one client
// connection whose MAX_CONCURRENT_STREAMS is 32, so most queue in the
// client, each echoing up to 6 messages, some of 100 KB (more than the
// backend stream window, held back, over several frames), and ending in one
// of several ways: a half-close read to its end, a cancel between
// messages, a cancel with a large answer not read, or the deadline.
// Afterwards the proxy holds no stream, no buffer, no retry copy, no
// pinned read buffer and no pending attempt; the backend no call; every
// call that reached the backend is counted once as ended. (Most streams
// are cancelled within a second: the rapid-reset bound is off.)
func TestH2llManyStreamsCancelled(t *testing.T) {
	verifyNoLeaks(t)
	ts := startTestserver(t, testserver.Config{Name: "b", Logger: quietLog})
	var ends atomic.Int64
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(ts.Addr()), Logger: quietLog,
		MaxConcurrentStreams: 32, MaxEarlyResets: -1, CountCallEnd: func(proxy.CallInfo) { ends.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	client := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String()))
	ctx := testkit.Context(t, 60*time.Second)
	const n = 300
	var wg sync.WaitGroup
	var opened, okEnds atomic.Int64
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(i), 11))
			way := r.IntN(4)
			d := 10 * time.Second
			if way == 3 {
				d = time.Duration(50+r.IntN(300)) * time.Millisecond
			}
			cctx, cancel := context.WithTimeout(ctx, d)
			defer cancel()
			st, err := client.FullDuplexCall(cctx)
			if err != nil {
				return
			}
			opened.Add(1)
			k := r.IntN(7)
			for j := 0; j < k; j++ {
				size := int32(100)
				if r.IntN(3) == 0 {
					size = 100_000
				}
				if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: size}}}); err != nil {
					return
				}
				if way == 2 && j == k-1 {
					cancel() // the answer is not read
					return
				}
				m, err := st.Recv()
				if err != nil {
					return
				}
				if len(m.GetPayload().GetBody()) != int(size) {
					t.Errorf("an answer of %d bytes, want %d", len(m.GetPayload().GetBody()), size)
					return
				}
				time.Sleep(time.Duration(r.IntN(20)) * time.Millisecond)
			}
			switch way {
			case 0:
				st.CloseSend()
				if _, err := st.Recv(); err == nil {
					t.Error("an answer after CloseSend")
				} else if err.Error() != "EOF" {
					t.Errorf("half-closed stream: %v", err)
				} else {
					okEnds.Add(1)
				}
			case 1, 2:
				cancel()
			case 3:
				<-cctx.Done()
			}
		}()
	}
	wg.Wait()
	testkit.WaitFor(ctx, t, "the proxy and the backend to let go of every stream", func() bool {
		return srv.ClientStreams() == 0 && ts.InFlight() == 0 && srv.MaxBufferedBytes() == 0 &&
			srv.MaxHeldBytes() == 0 && srv.PinnedReadBufs() == 0 && srv.PendingAttempts() == 0
	})
	// Call ends are counted after the stream is gone; give them a moment.
	testkit.WaitFor(ctx, t, "every call's end counted", func() bool { return ends.Load() >= ts.Calls() })
	time.Sleep(100 * time.Millisecond)
	t.Logf("opened %d, half-closed OK %d, backend calls %d, call ends %d", opened.Load(), okEnds.Load(), ts.Calls(), ends.Load())
	if e := ends.Load(); e > opened.Load() || e < ts.Calls() {
		t.Errorf("%d call ends counted, want between the backend's %d calls and the %d streams opened", e, ts.Calls(), opened.Load())
	}
	// The connection still works.
	if _, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 10}); err != nil {
		t.Errorf("a call afterwards: %v", err)
	}
}
