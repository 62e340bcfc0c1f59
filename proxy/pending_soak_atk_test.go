package proxy_test

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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

// TestWaitQueueChurn: many clients' calls of every shape (unary with and
// without a body, streams that send while they wait, deadlines, cancels,
// slow backends) through one backend that takes two streams at a time
// behind one connection, with a short queue and a short wait, and
// MaxStreamsPerBackend on top. Every call ends with a status a client can
// get from the proxy; the proxy's ends agree with the clients' on the
// codes the proxy decides; the director never sees UNAVAILABLE; and
// afterwards nothing is counted waiting or pending, the backend's slots
// are all free (calls go through one after another), and no goroutine is
// left.
func TestWaitQueueChurn(t *testing.T) {
	for _, tc := range []struct {
		perBackend int64
		conns      int
	}{{7, 1}, {0, 1}, {0, 2}, {9, 2}} {
		t.Run(fmt.Sprintf("perBackend%d_conns%d", tc.perBackend, tc.conns), func(t *testing.T) { testWaitQueueChurn(t, tc.perBackend, tc.conns) })
	}
}

func testWaitQueueChurn(t *testing.T, perBackend int64, conns int) {
	verifyNoLeaks(t)
	var (
		mu          sync.Mutex
		proxyCodes  = map[codes.Code]int{}
		ends        int
		endsBy      = map[string]int{}
		unavailable atomic.Int32
	)
	e := newEnv(t, envOpts{backends: 1,
		tscfg: func(i int, c *testserver.Config) {
			c.ServerOptions = append(c.ServerOptions, grpc.MaxConcurrentStreams(2))
		},
		pcfg: func(c *proxy.Config) {
			c.MaxBackendConns = conns
			c.MaxBackendPending = 6
			c.BackendPendingTimeout = 60 * time.Millisecond
			c.MaxStreamsPerBackend = perBackend
			c.OnCallEnd = func(ci proxy.CallInfo) {
				mu.Lock()
				if !strings.HasSuffix(ci.Method, "/EmptyCall") && !strings.HasSuffix(ci.Method, "/StreamingInputCall") {
					proxyCodes[ci.Code]++ // a call the client let run
				}
				ends++
				endsBy[ci.Method[strings.LastIndex(ci.Method, "/")+1:]+" "+ci.Code.String()]++
				mu.Unlock()
			}
		},
		dcfg: func(c *director.Config) { c.ResolveNow = func() { unavailable.Add(1) } },
	})
	unsettled := proxy.UnsettledStreams()
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 60*time.Second)
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	clientCodes := map[codes.Code]int{} // of the calls the clients let run
	all := map[codes.Code]int{}
	clientBy := map[string]int{"EmptyCall OK": 1}
	const workers, calls = 8, 40
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for range calls {
				var method string
				code, let := oneChurnCall(ctx, e, rng, &method)
				mu.Lock()
				all[code]++
				clientBy[method+" "+code.String()]++
				if let {
					clientCodes[code]++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	testkit.WaitFor(ctx, t, "nothing waiting", func() bool {
		return srv.Waiting() == 0 && srv.PendingAttempts() == 0 && e.backends[0].InFlight() == 0
	})
	// Every call the proxy saw ends there and leaves the client
	// connection. A call its client cancelled (or whose deadline passed)
	// at once may never have sent its HEADERS: a few fewer ends than
	// calls are allowed, no more ends than calls.
	testkit.WaitFor(ctx, t, "no stream left on the client connection", func() bool { return srv.ClientStreams() == 0 })
	want := workers*calls + 1
	endsCtx, cancelEnds := context.WithTimeout(ctx, 2*time.Second)
	for {
		mu.Lock()
		n := ends
		mu.Unlock()
		if n >= want || endsCtx.Err() != nil {
			break
		}
		time.Sleep(time.Millisecond)
	}
	cancelEnds()
	mu.Lock()
	if ends > want || ends < want-3 {
		diff := map[string]int{}
		for k, n := range clientBy {
			if d := n - endsBy[k]; d != 0 {
				diff[k] = d
			}
		}
		for k, n := range endsBy {
			if _, ok := clientBy[k]; !ok {
				diff[k] = -n
			}
		}
		t.Errorf("%d calls' ends of %d; clients saw more (+) or fewer (-) than the proxy logged: %v", ends, want, diff)
	}
	mu.Unlock()
	mu.Lock()
	t.Logf("clients saw %v; of the calls let run, %v; the proxy logged %v of those", all, clientCodes, proxyCodes)
	for c, n := range all {
		switch c {
		case codes.OK, codes.DeadlineExceeded, codes.Canceled, codes.Unavailable, codes.ResourceExhausted:
		default:
			t.Errorf("%d calls ended %v", n, c)
		}
	}
	for _, c := range []codes.Code{codes.OK, codes.Unavailable, codes.ResourceExhausted, codes.DeadlineExceeded, codes.Canceled} {
		if clientCodes[c] != proxyCodes[c] {
			t.Errorf("clients saw %d calls %v, the proxy logged %d", clientCodes[c], c, proxyCodes[c])
		}
	}
	mu.Unlock()
	if n := unavailable.Load(); n != 0 {
		t.Errorf("the director saw %d calls UNAVAILABLE", n)
	}
	// Every slot is back: calls that each take both slots in turn pass.
	for i := range 20 {
		if _, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: make([]byte, 1000)}}); err != nil {
			t.Fatalf("call %d after the churn: %v", i, err)
		}
	}
	hang, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"))
	defer cancel()
	var hw sync.WaitGroup
	for range 2 * conns {
		hw.Add(1)
		go func() { defer hw.Done(); e.client.EmptyCall(hang, &testgrpc.Empty{}) }()
	}
	testkit.WaitFor(ctx, t, "every slot taken", func() bool { return e.backends[0].InFlight() == int64(2*conns) })
	res := make(chan error, 1)
	go func() { _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); res <- err }()
	testkit.WaitFor(ctx, t, "one call waiting", func() bool { return srv.Waiting() == 1 })
	cancel()
	hw.Wait()
	if err := <-res; err != nil {
		t.Errorf("waiting call after the churn: %v", err)
	}
	checkSettled(t, unsettled)
}

// oneChurnCall makes one call of a random shape and returns its code, and
// whether the client let it run (no deadline, no cancel): those are
// UnaryCall and FullDuplexCall, the others EmptyCall and
// StreamingInputCall.
func oneChurnCall(ctx context.Context, e *env, rng *rand.Rand, method *string) (codes.Code, bool) {
	md := []string{}
	if d := rng.IntN(4); d > 0 {
		md = append(md, testserver.MetadataDelay, fmt.Sprintf("%dms", rng.IntN(25)))
	}
	cctx := metadata.AppendToOutgoingContext(ctx, md...)
	var cancel context.CancelFunc
	let := false
	switch rng.IntN(4) {
	case 0:
		// At least 10ms: a call cancelled sooner may never have sent its
		// HEADERS, and the proxy never sees it.
		cctx, cancel = context.WithTimeout(cctx, time.Duration(10+rng.IntN(80))*time.Millisecond)
	case 1:
		cctx, cancel = context.WithCancel(cctx)
		time.AfterFunc(time.Duration(10+rng.IntN(40))*time.Millisecond, cancel)
	default:
		cctx, cancel = context.WithCancel(cctx)
		let = true
	}
	defer cancel()
	switch rng.IntN(3) {
	case 0:
		if !let {
			*method = "EmptyCall"
			_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
			return status.Code(err), let
		}
		*method = "UnaryCall"
		_, err := e.client.UnaryCall(cctx, &testgrpc.SimpleRequest{ResponseSize: 10})
		return status.Code(err), let
	case 1:
		body := &testgrpc.Payload{Body: make([]byte, rng.IntN(200<<10))}
		if !let {
			*method = "StreamingInputCall"
			st, err := e.client.StreamingInputCall(cctx)
			if err != nil {
				return status.Code(err), let
			}
			st.Send(&testgrpc.StreamingInputCallRequest{Payload: body})
			_, err = st.CloseAndRecv()
			return status.Code(err), let
		}
		*method = "UnaryCall"
		_, err := e.client.UnaryCall(cctx, &testgrpc.SimpleRequest{ResponseSize: 100, Payload: body})
		return status.Code(err), let
	default:
		if !let {
			*method = "StreamingInputCall"
			st, err := e.client.StreamingInputCall(cctx)
			if err != nil {
				return status.Code(err), let
			}
			for range 1 + rng.IntN(4) {
				st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, rng.IntN(40<<10))}})
			}
			_, err = st.CloseAndRecv()
			return status.Code(err), let
		}
		*method = "FullDuplexCall"
		st, err := e.client.FullDuplexCall(cctx)
		if err != nil {
			return status.Code(err), let
		}
		for range 1 + rng.IntN(4) {
			if err := st.Send(&testgrpc.StreamingOutputCallRequest{
				Payload:            &testgrpc.Payload{Body: make([]byte, rng.IntN(40<<10))},
				ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}},
			}); err != nil {
				break
			}
		}
		st.CloseSend()
		for {
			if _, err := st.Recv(); err != nil {
				if err == io.EOF {
					return codes.OK, let
				}
				return status.Code(err), let
			}
		}
	}
}
