package proxy_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestAttack8ReplayIntegrity: client-streaming calls of a RetryOn method
// whose first attempt fails UNAVAILABLE (trailers-only) after the backend
// read some of the request messages (none, some, all): the retry on the
// other backend must receive the request exactly as the client sent it,
// the replayed part and the rest, each message whole and in order.
//
// It failed about once in a few thousand calls: a request DATA item the
// flow-control window cut in two was written as a large frame by
// reference and a small one copied, and the small one's write returned
// the buffer to its pool before the flush wrote the large part, so a
// retried request's message could reach the backend with another
// stream's bytes (the backend answered RESOURCE_EXHAUSTED "received
// message larger than max"). TestConnWriterSplitPayloadFreedAfterFlush
// is the deterministic regression test; this one runs many more calls
// with STREAMLB_ATTACKS=1:
//
//	STREAMLB_ATTACKS=1 go test -race -count=20 -run TestAttack8ReplayIntegrity ./proxy
func TestAttack8ReplayIntegrity(t *testing.T) {
	verifyNoLeaks(t)
	var seen sync.Map
	handler := func(ss grpc.ServerStream) error {
		md, _ := metadata.FromIncomingContext(ss.Context())
		id := md.Get("x-call")[0]
		failAfter, _ := strconv.Atoi(md.Get("x-fail-after")[0])
		_, again := seen.LoadOrStore(id, true)
		h := sha256.New()
		n := 0
		for {
			if !again && n == failAfter {
				return status.Error(codes.Unavailable, "try another")
			}
			var m []byte
			if err := ss.RecvMsg(&m); err != nil {
				break
			}
			hashMsg(h, m)
			n++
		}
		if !again {
			return status.Error(codes.Unavailable, "try another")
		}
		out := h.Sum(nil)
		return ss.SendMsg(&out)
	}
	a := serveRawGRPC(t, handler)
	b := serveRawGRPC(t, handler)
	var turn atomic.Int64
	picker := proxy.PickerFunc(func(context.Context, string) (string, func(error), error) {
		if turn.Add(1)%2 == 0 {
			return a, nil, nil
		}
		return b, nil, nil
	})
	srv, err := proxy.New(proxy.Config{Picker: picker, Logger: quietLog, RetryOn: []string{"/x.Y/"}, RetryBudget: 1 << 20, MaxConnBufferedBytes: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	cc := fixedWindowConn(t, ln.Addr().String(), 64<<10)
	ctx := testkit.Context(t, 30*time.Second)
	sizes := []int{0, 1, 4091, 4096, 100, 16379, 16384, 3, 7000}
	const msgs = 9 // about 48 KiB: within the retry buffer
	reps := 3
	if os.Getenv("STREAMLB_ATTACKS") != "" {
		reps = 60
	}
	var wg sync.WaitGroup
	errs := make(chan error, 6*reps)
	call := 0
	for _, failAfter := range []int{0, 1, 2, 4, 8, 9} {
		for rep := range reps {
			call++
			wg.Add(1)
			go func(call int) {
				defer wg.Done()
				cctx := metadata.AppendToOutgoingContext(ctx, "x-call", strconv.Itoa(call), "x-fail-after", strconv.Itoa(failAfter))
				st, err := cc.NewStream(cctx, &grpc.StreamDesc{ClientStreams: true}, "/x.Y/Z", grpc.ForceCodec(rawBytes{}))
				if err != nil {
					errs <- err
					return
				}
				h := sha256.New()
				for i := range msgs {
					m := seededMessage(uint64(call), i, sizes[i%len(sizes)])
					hashMsg(h, m)
					if rep%3 == 1 {
						time.Sleep(time.Millisecond)
					}
					if err := st.SendMsg(&m); err != nil {
						break // the status comes from RecvMsg
					}
				}
				st.CloseSend()
				var got []byte
				if err := st.RecvMsg(&got); err != nil {
					errs <- fmt.Errorf("call %d (fail after %d): %v", call, failAfter, err)
					return
				}
				if string(got) != string(h.Sum(nil)) {
					errs <- fmt.Errorf("call %d (fail after %d): the retry's backend got a request other than the one sent", call, failAfter)
				}
			}(call)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
