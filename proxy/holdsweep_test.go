package proxy_test

import (
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
)

// TestHoldSweepEarlierBound: the response headers held back for a retry
// are bounded by one timer per backend connection (listHoldLocked), armed
// for the earliest bound. A watch whose client sent its request holds its
// headers up to heldHeadersMax (4 s here); a bidi call on the same
// backend connection whose client sent nothing yet must get its headers
// after heldHeadersWait (100 ms) all the same, not when the watch's bound
// passes, and so must a second one after the first was released (the
// timer armed again); the watch's come at its own bound, before its first
// message.
func TestHoldSweepEarlierBound(t *testing.T) {
	verifyNoLeaks(t)
	proxy.SetHeldHeadersMax(t, 4*time.Second)
	ts := startTestserver(t, testserver.Config{Name: "b", Logger: quietLog})
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(ts.Addr()), Logger: quietLog, RetryOn: []string{"/grpc.testing.TestService/"}})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	ctx := testkit.Context(t, 30*time.Second)
	client := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String()))

	watchStart := time.Now()
	watch, err := client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
		ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10, IntervalUs: 8_000_000}}})
	if err != nil {
		t.Fatal(err)
	}
	watchHeaders := make(chan metadata.MD, 1)
	go func() {
		h, _ := watch.Header()
		watchHeaders <- h
	}()
	// Let the watch's headers be held first, so that the connection's
	// timer is armed for its bound.
	time.Sleep(300 * time.Millisecond)

	for i := range 2 {
		bidi, err := client.FullDuplexCall(ctx)
		if err != nil {
			t.Fatal(err)
		}
		h, err := bidi.Header()
		if err != nil || len(h.Get(testserver.HeaderBackend)) == 0 {
			t.Fatalf("bidi call %d: response headers %v, %v", i, h, err)
		}
		select {
		case h := <-watchHeaders:
			t.Fatalf("bidi call %d got its headers only after the watch's (%v, after %v): it waited for the watch's bound", i, h, time.Since(watchStart).Round(time.Millisecond))
		default:
		}
		if err := bidi.CloseSend(); err != nil {
			t.Fatal(err)
		}
		if _, err := bidi.Recv(); err == nil {
			t.Fatalf("bidi call %d: an answer to no request", i)
		}
	}

	select {
	case h := <-watchHeaders:
		took := time.Since(watchStart)
		if len(h.Get(testserver.HeaderBackend)) == 0 || took >= 8*time.Second {
			t.Errorf("the watch's headers: %v after %v, want the backend's at its 4 s bound, before its first message (8 s)", h, took.Round(time.Millisecond))
		}
	case <-ctx.Done():
		t.Fatal("the watch's headers never came")
	}
	if _, err := watch.Recv(); err != nil {
		t.Fatalf("the watch's first message: %v", err)
	}
}

// TestHoldSweepManyHolds: 40 watches on one backend connection hold their
// headers at once; the connection's sweep relays every one of them at
// the bound (1 s here), none is left waiting for its first message, and
// every message follows.
func TestHoldSweepManyHolds(t *testing.T) {
	verifyNoLeaks(t)
	proxy.SetHeldHeadersMax(t, time.Second)
	ts := startTestserver(t, testserver.Config{Name: "b", Logger: quietLog})
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(ts.Addr()), Logger: quietLog, RetryOn: []string{"/grpc.testing.TestService/"}})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	ctx := testkit.Context(t, 30*time.Second)
	client := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String()))
	const n = 40
	type result struct {
		h   metadata.MD
		err error
		at  time.Duration
	}
	res := make(chan result, n)
	start := time.Now()
	for range n {
		go func() {
			st, err := client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
				ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10, IntervalUs: 6_000_000}}})
			if err != nil {
				res <- result{err: err}
				return
			}
			h, err := st.Header()
			at := time.Since(start)
			if err == nil {
				_, err = st.Recv()
			}
			res <- result{h, err, at}
		}()
	}
	for range n {
		r := <-res
		if r.err != nil || len(r.h.Get(testserver.HeaderBackend)) == 0 || r.at >= 6*time.Second {
			t.Errorf("a watch: headers %v after %v, then %v; want the backend's at the 1 s bound, then its message", r.h, r.at.Round(time.Millisecond), r.err)
		}
	}
}
