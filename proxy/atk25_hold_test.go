package proxy_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// holdEnv is a proxy naming both streaming methods in --retry-on in
// front of bad (every call's first attempt) and good (its retries).
func holdEnv(t *testing.T, bad testserver.Config) (client testgrpc.TestServiceClient, badSrv *testserver.Server, srv *proxy.Server) {
	t.Helper()
	bad.Name, bad.Logger = "bad", quietLog
	badSrv = startTestserver(t, bad)
	good := startTestserver(t, testserver.Config{Name: "good", Logger: quietLog})
	srv, err := proxy.New(proxy.Config{Picker: firstThenOthers{badSrv.Addr(), good.Addr()}, Logger: quietLog,
		RetryOn: []string{"/grpc.testing.TestService/FullDuplexCall", "/grpc.testing.TestService/StreamingOutputCall"}})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	return testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String())), badSrv, srv
}

// TestAtk25HeldHeadersThenUnavailableRetried: a server-streaming call to
// a --retry-on method whose first backend sends its response headers,
// then, some time later but within the hold, ends UNAVAILABLE with no
// message: the client has seen nothing, so the call goes to the second
// backend, whose answer the client gets, headers included.
func TestAtk25HeldHeadersThenUnavailableRetried(t *testing.T) {
	verifyNoLeaks(t)
	for _, after := range []time.Duration{0, 50 * time.Millisecond, 400 * time.Millisecond} {
		t.Run(after.String(), func(t *testing.T) {
			client, _, _ := holdEnv(t, testserver.Config{
				StreamingOutputCallF: func(_ *testgrpc.StreamingOutputCallRequest, st testgrpc.TestService_StreamingOutputCallServer) error {
					time.Sleep(after)
					return status.Error(codes.Unavailable, "bad backend")
				}})
			ctx := testkit.Context(t, 10*time.Second)
			var hdr metadata.MD
			st, err := client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
				ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}, grpc.Header(&hdr))
			if err != nil {
				t.Fatal(err)
			}
			msgs, err := drain(st.Recv)
			if err != nil || len(msgs) != 1 {
				t.Fatalf("got %d messages, %v; want the good backend's one, OK", len(msgs), err)
			}
			if got := hdr.Get(testserver.HeaderBackend); len(got) != 1 || got[0] != "good" || hdrFrom(hdr) != "good" {
				t.Errorf("response headers %v, want the good backend's alone", hdr)
			}
		})
	}
}

// TestAtk25EndDuringHold: a bidi call to a --retry-on method whose
// backend sends its response headers and then waits for the client; the
// call ends while the proxy holds those headers back (the client
// cancels, or its deadline passes, before it sent anything). The client
// gets CANCELED or DEADLINE_EXCEEDED at once, the backend sees the call
// cancelled, and the next call on the connection works.
func TestAtk25EndDuringHold(t *testing.T) {
	verifyNoLeaks(t)
	for _, how := range []string{"cancel", "deadline"} {
		t.Run(how, func(t *testing.T) {
			var cancelled atomic.Int32
			client, _, srv := holdEnv(t, testserver.Config{
				OnCancel: func(string) { cancelled.Add(1) },
				FullDuplexCallF: func(st testgrpc.TestService_FullDuplexCallServer) error {
					if _, err := st.Recv(); err != nil {
						return err
					}
					return st.Send(&testgrpc.StreamingOutputCallResponse{})
				}})
			ctx := testkit.Context(t, 10*time.Second)
			for range 20 {
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				want := codes.Canceled
				if how == "deadline" {
					cancel()
					cctx, cancel = context.WithTimeout(ctx, 40*time.Millisecond)
					want = codes.DeadlineExceeded
				}
				st, err := client.FullDuplexCall(cctx)
				if err != nil {
					t.Fatal(err)
				}
				start := time.Now()
				if how == "cancel" {
					time.AfterFunc(40*time.Millisecond, cancel)
				}
				_, err = st.Recv()
				took := time.Since(start)
				cancel()
				if status.Code(err) != want || took > time.Second {
					t.Fatalf("call ended during the hold: %v after %v, want %v at once", err, took.Round(time.Millisecond), want)
				}
			}
			testkit.WaitFor(ctx, t, "backend handlers to see their calls cancelled", func() bool { return cancelled.Load() == 20 })
			testkit.WaitFor(ctx, t, "client streams to go", func() bool { return srv.ClientStreams() == 0 })
			st, err := client.FullDuplexCall(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := st.Send(&testgrpc.StreamingOutputCallRequest{}); err != nil {
				t.Fatal(err)
			}
			if _, err := st.Recv(); err != nil {
				t.Fatalf("next call: %v", err)
			}
			st.CloseSend()
		})
	}
}

// TestAtk25GoAwayDuringHold: the backend sends its response headers, then
// goes away gracefully (GOAWAY, its handler still running) while the
// proxy holds them back; the handler answers 200 ms later. The client
// must get the whole answer: headers, message, OK.
func TestAtk25GoAwayDuringHold(t *testing.T) {
	verifyNoLeaks(t)
	inHandler := make(chan struct{}, 1)
	client, bad, _ := holdEnv(t, testserver.Config{
		StreamingOutputCallF: func(_ *testgrpc.StreamingOutputCallRequest, st testgrpc.TestService_StreamingOutputCallServer) error {
			inHandler <- struct{}{}
			time.Sleep(200 * time.Millisecond)
			return st.Send(&testgrpc.StreamingOutputCallResponse{})
		}})
	ctx := testkit.Context(t, 10*time.Second)
	var hdr metadata.MD
	st, err := client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{}, grpc.Header(&hdr))
	if err != nil {
		t.Fatal(err)
	}
	<-inHandler
	stopped := make(chan struct{})
	go func() { bad.GracefulStop(); close(stopped) }()
	msgs, err := drain(st.Recv)
	if err != nil || len(msgs) != 1 || hdrFrom(hdr) != "bad" {
		t.Fatalf("got %d messages, %v, headers %v; want the bad backend's whole answer", len(msgs), err, hdr)
	}
	<-stopped
}

// TestAtk25BackendDiesDuringHold: the backend sends its response headers
// and its connection is cut while the proxy holds them back. The client
// has seen nothing: it gets the second backend's answer or UNAVAILABLE,
// never INTERNAL, a bare reset or a hang.
func TestAtk25BackendDiesDuringHold(t *testing.T) {
	verifyNoLeaks(t)
	inHandler := make(chan struct{}, 1)
	client, bad, _ := holdEnv(t, testserver.Config{
		StreamingOutputCallF: func(_ *testgrpc.StreamingOutputCallRequest, st testgrpc.TestService_StreamingOutputCallServer) error {
			inHandler <- struct{}{}
			<-st.Context().Done()
			return st.Context().Err()
		}})
	ctx := testkit.Context(t, 10*time.Second)
	var hdr metadata.MD
	st, err := client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
		ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}}, grpc.Header(&hdr))
	if err != nil {
		t.Fatal(err)
	}
	<-inHandler
	bad.Stop()
	msgs, err := drain(st.Recv)
	if c := status.Code(err); c != codes.OK && c != codes.Unavailable {
		t.Fatalf("backend cut during the hold: %d messages, %v; want the good backend's answer or UNAVAILABLE", len(msgs), err)
	}
	if err == nil && (len(msgs) != 1 || hdrFrom(hdr) != "good") {
		t.Errorf("retried: %d messages, headers %v; want the good backend's answer alone", len(msgs), hdr)
	}
}

// TestAtk25ManyHeldHeaders: 400 concurrent bidi calls to a --retry-on
// method whose backend sends its headers at once and answers the
// client's messages only; each client reads the headers before it sends.
// Each must get them within the hold (100 ms, while the client sent
// nothing), then an answer per message, and everything must go once the
// calls end.
func TestAtk25ManyHeldHeaders(t *testing.T) {
	verifyNoLeaks(t)
	client, _, srv := holdEnv(t, testserver.Config{
		FullDuplexCallF: func(st testgrpc.TestService_FullDuplexCallServer) error {
			for {
				if _, err := st.Recv(); err != nil {
					return nil
				}
				if err := st.Send(&testgrpc.StreamingOutputCallResponse{}); err != nil {
					return err
				}
			}
		}})
	ctx := testkit.Context(t, 30*time.Second)
	const n = 400
	var wg sync.WaitGroup
	errs := make(chan error, n)
	var slowest atomic.Int64
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := client.FullDuplexCall(ctx)
			if err != nil {
				errs <- err
				return
			}
			start := time.Now()
			h, err := st.Header()
			if d := int64(time.Since(start)); d > slowest.Load() {
				slowest.Store(d)
			}
			if err != nil || hdrFrom(h) != "bad" {
				errs <- errors.Join(errors.New("headers"), err)
				return
			}
			for range 3 {
				if err := st.Send(&testgrpc.StreamingOutputCallRequest{}); err != nil {
					errs <- err
					return
				}
				if _, err := st.Recv(); err != nil {
					errs <- err
					return
				}
			}
			st.CloseSend()
			if _, err := st.Recv(); status.Code(err) != codes.OK && err.Error() != "EOF" {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if d := time.Duration(slowest.Load()); d > 5*time.Second {
		t.Errorf("slowest headers after %v", d)
	}
	testkit.WaitFor(ctx, t, "client streams to go", func() bool { return srv.ClientStreams() == 0 })
}

// hdrFrom is the backend named in response headers h.
func hdrFrom(h metadata.MD) string {
	if v := h.Get(testserver.HeaderBackend); len(v) == 1 {
		return v[0]
	}
	return ""
}
