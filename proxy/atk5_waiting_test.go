package proxy_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk5WaitingCallsSurviveBackendLoss: a backend takes 2 streams at
// a time (MAX_CONCURRENT_STREAMS) and the proxy keeps one connection to
// it, so most calls picked for it cannot go to it (the first ones wait
// for a slot until its SETTINGS arrive; later ones are refused there and
// sent to the other backend). The backend is then hard-killed or stopped
// gracefully. The calls that never reached it must end OK on the other
// backend; only the two running on it may fail, UNAVAILABLE.
func TestAtk5WaitingCallsSurviveBackendLoss(t *testing.T) {
	for _, how := range []string{"kill", "graceful"} {
		t.Run(how, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{backends: 2, policy: "round_robin",
				tscfg: func(i int, c *testserver.Config) {
					*c = atk5Config(c.Name)
					if i == 0 {
						c.ServerOptions = []grpc.ServerOption{grpc.MaxConcurrentStreams(2)}
					}
				},
				pcfg: func(c *proxy.Config) { c.MaxBackendConns = 1 },
			})
			ctx := testkit.Context(t, 30*time.Second)
			const n = 30
			var wg sync.WaitGroup
			errs := make(chan error, n)
			for i := 0; i < n; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
						Payload:            &testgrpc.Payload{Body: []byte{byte(i)}},
						ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10, IntervalUs: 400_000}, {Size: 10}}})
					if err == nil {
						_, err = drain(st.Recv)
					}
					errs <- err
				}()
			}
			time.Sleep(150 * time.Millisecond)
			if how == "kill" {
				e.backends[0].Stop()
			} else {
				go e.backends[0].GracefulStop()
			}
			wg.Wait()
			close(errs)
			failed := 0
			for err := range errs {
				if err != nil {
					failed++
					if status.Code(err) != codes.Unavailable || how == "graceful" {
						t.Errorf("call: %v", err)
					}
				}
			}
			t.Logf("%d of %d calls failed; backend 0 served %d", failed, n, e.backends[0].Calls())
			if failed > 2 {
				t.Errorf("%d calls failed; only the 2 running on the lost backend may", failed)
			}
		})
	}
}

// atk5OneMessage is a server-streaming call of one message of size bytes,
// sent after intervalUs, for a request body of seed; a message other than
// the one asked for is an error.
func atk5OneMessage(ctx context.Context, client testgrpc.TestServiceClient, seed []byte, size, intervalUs int32) error {
	st, err := client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
		Payload:            &testgrpc.Payload{Body: seed},
		ResponseParameters: []*testgrpc.ResponseParameters{{Size: size, IntervalUs: intervalUs}}})
	if err != nil {
		return err
	}
	msgs, err := drain(st.Recv)
	if err == nil && (len(msgs) != 1 || atk5Sum(msgs[0].GetPayload().GetBody()) != atk5Sum(atk5Bytes(seed, 0, int(size)))) {
		return errors.New("wrong answer")
	}
	return err
}

// TestAtk5WaitingCallsCancelled: one backend taking one stream at a
// time, one backend connection; many calls at once, each giving up
// (deadline) after 20 to 310 ms, some while the backend restarts
// gracefully. What has no slot waits for one (--max-backend-pending),
// and the calls run, expire, or are refused UNAVAILABLE past the queue. Afterwards the slot accounting is
// intact: calls go through one after another again, and nothing is left
// held.
func TestAtk5WaitingCallsCancelled(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1,
		tscfg: func(i int, c *testserver.Config) {
			*c = atk5Config(c.Name)
			c.ServerOptions = []grpc.ServerOption{grpc.MaxConcurrentStreams(1)}
		},
		pcfg: func(c *proxy.Config) { c.MaxBackendConns = 1 },
	})
	ctx := testkit.Context(t, 30*time.Second)
	call := func(d time.Duration) error {
		cctx, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		return atk5OneMessage(cctx, e.client, []byte{1, 2, 3, 4, 5, 6, 7, 8}, 1000, 50_000)
	}
	for round := 0; round < 3; round++ {
		var wg sync.WaitGroup
		for i := 0; i < 30; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := call(time.Duration(20+i*10) * time.Millisecond)
				// Past MaxBackendConns, all full, a call waits for a
				// slot; past the queue it is refused (UNAVAILABLE).
				if c := status.Code(err); err != nil && c != codes.DeadlineExceeded && c != codes.Unavailable {
					t.Errorf("round %d call %d: %v", round, i, err)
				}
			}()
		}
		if round == 1 {
			time.Sleep(100 * time.Millisecond)
			atk5Restart(t, e, 0, true)
			// atk5Restart's new backend takes any number of streams;
			// this round only checks that nothing hangs.
		}
		wg.Wait()
		// The slot is free again: calls one after another all succeed.
		// The slot is free again: calls one after another all succeed.
		// The proxy may still hold a given-up call's slot for a moment
		// (its reset to the backend not yet written), and refuses at
		// once meanwhile; it must not stay refused.
		for i := 0; i < 5; i++ {
			var err error
			for try := 0; try < 20; try++ {
				if err = call(5 * time.Second); err == nil || !strings.Contains(err.Error(), "stream limit") {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if err != nil {
				t.Fatalf("round %d: call after the cancelled ones: %v", round, err)
			}
		}
	}
	atk5Budgets(ctx, t, e.srv.(*proxy.Server))
}
