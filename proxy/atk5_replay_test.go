package proxy_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk5ReplayByteExact: backends that answer UNAVAILABLE half the
// time after reading part or all of a request (before any response
// message), with every TestService method in RetryOn, while one backend
// restarts gracefully now and then. The proxy replays what it kept to
// another backend: whatever answers OK must have seen exactly the bytes
// the client sent, in order, once; calls fail only UNAVAILABLE.
func TestAtk5ReplayByteExact(t *testing.T) {
	verifyNoLeaks(t)
	atk5Resources(t)
	var fails atomic.Int64
	flaky := func(c *testserver.Config) {
		base := atk5Config(c.Name)
		*c = base
		c.StreamingInputCallF = func(st testgrpc.TestService_StreamingInputCallServer) error {
			h := sha256.New()
			fail := rand.IntN(2) == 0
			for n := 0; ; n++ {
				if fail && n == 2 {
					fails.Add(1)
					return status.Error(codes.Unavailable, "flaky")
				}
				in, err := st.Recv()
				if errors.Is(err, io.EOF) {
					if fail {
						fails.Add(1)
						return status.Error(codes.Unavailable, "flaky at the end")
					}
					st.SetTrailer(metadata.Pairs("x-sum", hex.EncodeToString(h.Sum(nil)[:8])))
					return st.SendAndClose(&testgrpc.StreamingInputCallResponse{})
				}
				if err != nil {
					return err
				}
				atk5HashBody(h, in.GetPayload().GetBody())
			}
		}
		c.FullDuplexCallF = func(st testgrpc.TestService_FullDuplexCallServer) error {
			// Reads up to 3 messages first, then may fail before answering.
			var got [][]byte
			for len(got) < 3 {
				in, err := st.Recv()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					return err
				}
				got = append(got, in.GetPayload().GetBody())
			}
			if rand.IntN(2) == 0 {
				fails.Add(1)
				return status.Error(codes.Unavailable, "flaky bidi")
			}
			for _, b := range got {
				if err := st.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: b}}); err != nil {
					return err
				}
			}
			return base.FullDuplexCallF(st)
		}
	}
	e := newEnv(t, envOpts{
		backends: 3,
		tscfg:    func(i int, c *testserver.Config) { flaky(c) },
		pcfg: func(c *proxy.Config) {
			c.RetryOn = []string{"/grpc.testing.TestService/"}
			c.MaxRetries = 6
			c.RetryBudget = 100000
			c.RetryBudgetRatio = 1
		},
	})
	ctx := testkit.Context(t, 60*time.Second)
	var mu sync.Mutex
	var res []atk5Result
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 7))
			for i := 0; i < 25; i++ {
				var rr atk5Result
				// Requests of at most 60 KiB all told, so the retry
				// buffer (64 KiB) keeps them.
				sizes := []int{0, 1, 100, 4096, 10000}
				if i%3 == 2 {
					// Past the retry buffer: such a call may fail
					// UNAVAILABLE, but never replay a part.
					sizes = []int{0, 30000, 40000, 70000, 200000}
				}
				if w%2 == 0 {
					rr = atk5ClientStream(ctx, e.client, r, sizes)
				} else {
					rr = atk5BidiN(ctx, e.client, r, sizes)
				}
				mu.Lock()
				res = append(res, rr)
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < 3; i++ {
		time.Sleep(200 * time.Millisecond)
		// restart keeps the flaky handlers
		old := e.backends[i]
		addr := old.Addr()
		old.GracefulStop()
		c := testserver.Config{Name: old.Name()}
		flaky(&c)
		e.backends[i] = atk5BackendCfg(t, c, addr)
	}
	wg.Wait()
	atk5Budgets(ctx, t, e.srv.(*proxy.Server))
	bad, ok := 0, 0
	for _, r := range res {
		if r.err == nil && r.corrupt == "" {
			ok++
		}
		if r.corrupt != "" {
			t.Errorf("%s: CORRUPT: %s", r.kind, r.corrupt)
			bad++
		} else if r.err != nil && status.Code(r.err) != codes.Unavailable {
			t.Errorf("%s: %v", r.kind, r.err)
		}
	}
	t.Logf("%d calls, %d OK, %d backend failures injected", len(res), ok, fails.Load())
}

// atk5ClientStream is a client-streaming call of messages of the given
// sizes, checked against the backend's sum.
func atk5ClientStream(ctx context.Context, client testgrpc.TestServiceClient, r *rand.Rand, sizes []int) atk5Result {
	res := atk5Result{kind: "client-stream"}
	st, err := client.StreamingInputCall(ctx)
	if err != nil {
		res.err = err
		return res
	}
	h := sha256.New()
	for i := 0; i < 1+r.IntN(5); i++ {
		b := atk5RandBody(r, sizes[r.IntN(len(sizes))])
		atk5HashBody(h, b)
		if st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: b}}) != nil {
			break
		}
	}
	if _, err := st.CloseAndRecv(); err != nil {
		res.err = err
		return res
	}
	if got, want := lastMD(st.Trailer(), "x-sum"), hex.EncodeToString(h.Sum(nil)[:8]); got != want {
		res.corrupt = "client stream: backend saw sum " + got + ", want " + want
	}
	return res
}

// atk5BidiN sends messages of the given sizes over a FullDuplexCall, then
// half-closes, and checks the echoes in order.
func atk5BidiN(ctx context.Context, client testgrpc.TestServiceClient, r *rand.Rand, sizes []int) atk5Result {
	res := atk5Result{kind: "bidi"}
	st, err := client.FullDuplexCall(ctx)
	if err != nil {
		res.err = err
		return res
	}
	var sent [][]byte
	for i := 0; i < 1+r.IntN(5); i++ {
		sent = append(sent, atk5RandBody(r, sizes[r.IntN(len(sizes))]))
	}
	go func() {
		for _, b := range sent {
			if st.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: b}}) != nil {
				return
			}
		}
		st.CloseSend()
	}()
	for i := 0; ; i++ {
		m, err := st.Recv()
		if errors.Is(err, io.EOF) {
			if i != len(sent) {
				res.corrupt = fmt.Sprintf("bidi: %d answers, want %d", i, len(sent))
			}
			return res
		}
		if err != nil {
			res.err = err
			return res
		}
		if i >= len(sent) {
			res.corrupt = "bidi: extra answer"
			return res
		}
		if got, want := atk5Sum(m.GetPayload().GetBody()), atk5Sum(sent[i]); got != want {
			res.corrupt = fmt.Sprintf("bidi answer %d: sum %s, want %s", i, got, want)
			return res
		}
	}
}
