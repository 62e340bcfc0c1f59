package proxy_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestGoAwayMovesUnsentCalls: a backend that cycles its connections
// gracefully (grpc-go's MaxConnectionAge 50 ms, grace 50 ms) and takes 2
// streams on each, under 48 concurrent short calls with the proxy's
// defaults (8 connections, so most calls wait for a slot). A call
// waiting on a connection when its GOAWAY comes was never sent there and
// is placed again; counted as an attempt, the third GOAWAY a waiting call
// met failed it UNAVAILABLE "is going away (GOAWAY) and did not process
// the call": 100-190 calls of about 2,000 (found by a helper comparing
// with a direct grpc-go client, which loses none). Calls in flight when a
// connection's grace ends may still be lost (EOF); none the backend never
// saw may be.
func TestGoAwayMovesUnsentCalls(t *testing.T) {
	calls, unsent, fails := cycleUnderLoad(t, nil, nil)
	t.Logf("%d calls, failures %v", calls, fails)
	if unsent > 0 {
		t.Errorf("%d calls failed that the backend never processed: %v", unsent, fails)
	}
	if calls < 200 {
		t.Errorf("only %d calls were made in 1.5 s", calls)
	}
}

// TestGoAwayUnsentMovesBounded: such moves are bounded per call (a backend
// could send GOAWAY on every connection it is given before it takes a
// call): past the bound they count as attempts again. At 0, as before
// the bound, calls in TestGoAwayMovesUnsentCalls's load fail on their
// third GOAWAY.
func TestGoAwayUnsentMovesBounded(t *testing.T) {
	// No retries: since the connections going away no longer count at
	// MaxBackendConns, calls wait less, and few met the three GOAWAYs
	// that MaxRetries 2 lets pass; with none, one GOAWAY fails a call.
	calls, unsent, fails := cycleUnderLoad(t, func(s *proxy.Server) { s.SetMaxUnsentMoves(0) }, func(c *proxy.Config) { c.MaxRetries = -1 })
	t.Logf("%d calls, failures %v", calls, fails)
	if unsent == 0 {
		t.Errorf("with the bound at 0, no call of %d failed on a GOAWAY before it was sent: the bound is not applied", calls)
	}
}

// cycleUnderLoad runs TestGoAwayMovesUnsentCalls's load for 1.5 s and
// returns the calls made, those that failed because a backend connection
// went away before the call was sent on it, and every failure by status.
func cycleUnderLoad(t *testing.T, hook func(*proxy.Server), pcfg func(*proxy.Config)) (int64, int, map[string]int) {
	e := newEnv(t, envOpts{backends: 1, hook: hook, pcfg: pcfg, tscfg: func(_ int, c *testserver.Config) {
		c.ServerOptions = append(c.ServerOptions, grpc.MaxConcurrentStreams(2),
			grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionAge: 50 * time.Millisecond, MaxConnectionAgeGrace: 50 * time.Millisecond}))
	}})
	client := testgrpc.NewTestServiceClient(e.dial(e.addr))
	var calls atomic.Int64
	var mu sync.Mutex
	fails := map[string]int{}
	stop := time.Now().Add(1500 * time.Millisecond)
	var wg sync.WaitGroup
	for w := range 48 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(stop) && calls.Add(1) <= 20000; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				ctx = metadata.AppendToOutgoingContext(ctx, testserver.MetadataDelay, fmt.Sprintf("%dms", (w+i)%20))
				_, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
				cancel()
				if err != nil {
					st := status.Convert(err)
					mu.Lock()
					fails[st.Code().String()+": "+st.Message()]++
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	unsent := 0
	for msg, n := range fails {
		if strings.Contains(msg, "did not process the call") {
			unsent += n
		}
	}
	return min(calls.Load(), 20000), unsent, fails
}
