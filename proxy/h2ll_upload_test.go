package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// firstThenOthers picks addrs[0] for a call's first attempt and the first
// untried address for its retries.
type firstThenOthers []string

func (p firstThenOthers) Pick(context.Context, string) (string, func(error), error) {
	return p[0], nil, nil
}

func (p firstThenOthers) PickExcluding(_ context.Context, _ string, tried []string) (string, func(error), error) {
	for _, a := range p {
		if !slices.Contains(tried, a) {
			return a, nil, nil
		}
	}
	return p[0], nil, nil
}

// TestH2llUploadBackendFailsMidStream: client-streaming uploads of 1 MiB
// (16 KiB messages, 16 times the retry buffer) to a --retry-on method;
// the first backend ends the call UNAVAILABLE after it read a given part
// of the upload (inside the retry buffer, and past it), having sent its
// response headers or not, or resets the stream. Within the buffer the
// call goes to the second backend, which must see the whole upload; past
// it the client must get the first backend's UNAVAILABLE. No call may
// hang, and once they end the client connection holds no stream, no
// buffer and no retry copy.
func TestH2llUploadBackendFailsMidStream(t *testing.T) {
	verifyNoLeaks(t)
	const (
		msg   = 16 << 10
		total = 1 << 20
	)
	var failAfter sync.Map // a call's tag: the bytes the first backend fails after
	bad := startTestserver(t, testserver.Config{Name: "bad", Logger: quietLog,
		StreamingInputCallF: func(st testgrpc.TestService_StreamingInputCallServer) error {
			got := 0
			for {
				m, err := st.Recv()
				if err != nil {
					return err
				}
				got += len(m.GetPayload().GetBody())
				if after, _ := failAfter.Load(string(m.GetPayload().GetBody()[:8])); got >= after.(int) {
					return status.Error(codes.Unavailable, "bad: gone")
				}
			}
		}})
	good := startTestserver(t, testserver.Config{Name: "good", Logger: quietLog})
	srv, err := proxy.New(proxy.Config{Picker: firstThenOthers{bad.Addr(), good.Addr()}, Logger: quietLog,
		RetryOn: []string{"/grpc.testing.TestService/"}})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	cc := e2eConn(t, ln.Addr().String())
	client := testgrpc.NewTestServiceClient(cc)
	ctx := testkit.Context(t, 60*time.Second)
	for i, after := range []int{msg, 3 * msg, 4 * msg, 5 * msg, 20 * msg, total} {
		tag := fmt.Sprintf("call%04d", i)
		failAfter.Store(tag, after)
		t.Run(fmt.Sprintf("fails after %d KiB", after>>10), func(t *testing.T) {
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			st, err := client.StreamingInputCall(cctx)
			if err != nil {
				t.Fatal(err)
			}
			body := make([]byte, msg)
			copy(body, tag)
			for sent := 0; sent < total; sent += msg {
				if sent == 2*msg {
					// The first backend has read what it fails after,
					// if that is 16 KiB, while the call is retryable.
					time.Sleep(100 * time.Millisecond)
				}
				if err := st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: body}}); err != nil {
					if !errors.Is(err, io.EOF) {
						t.Fatalf("send: %v", err)
					}
					break
				}
			}
			resp, err := st.CloseAndRecv()
			// The buffer keeps 48 KiB at least (RetryBufferSize less 16 KiB).
			if after < 3*msg {
				if err != nil || resp.GetAggregatedPayloadSize() != total {
					t.Errorf("failure within the retry buffer: %v, %d bytes at the retry's backend, want success with %d", err, resp.GetAggregatedPayloadSize(), total)
				}
			} else if after > 4*msg {
				if status.Code(err) != codes.Unavailable {
					t.Errorf("failure past the retry buffer: %v (%d bytes), want UNAVAILABLE", err, resp.GetAggregatedPayloadSize())
				}
			} else if err != nil && status.Code(err) != codes.Unavailable {
				t.Errorf("failure at the retry buffer's edge: %v, want success or UNAVAILABLE", err)
			}
			if cctx.Err() != nil {
				t.Errorf("the call took until its deadline")
			}
			waitViewsFreed(t, srv, "after the upload")
			testkit.WaitFor(ctx, t, "no stream left", func() bool {
				return srv.ClientStreams() == 0 && srv.MaxHeldBytes() == 0
			})
		})
	}
}

// TestH2llUploadPastBufferNeverSent: uploads of 1 MiB, sent as fast as
// the windows allow (far past the 64 KiB retry buffer), to a method not
// named for retries, whose first backend accepts the connection and never
// completes the HTTP/2 handshake, or whose first backend refuses
// connections. Nothing reached that backend: the call goes to the second
// one with all it had queued, and the second must see the whole upload.
func TestH2llUploadPastBufferNeverSent(t *testing.T) {
	verifyNoLeaks(t)
	silent := testkit.ServeTCP(t, func(nc net.Conn) { io.Copy(io.Discard, nc) })
	refusing := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		return addr
	}()
	good := startTestserver(t, testserver.Config{Name: "good", Logger: quietLog})
	for _, tc := range []struct{ name, first string }{{"no handshake", silent}, {"refused", refusing}} {
		t.Run(tc.name, func(t *testing.T) {
			srv, err := proxy.New(proxy.Config{Picker: firstThenOthers{tc.first, good.Addr()}, Logger: quietLog,
				HandshakeTimeout: 300 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			ln := serveProxy(t, srv)
			client := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String()))
			ctx := testkit.Context(t, 20*time.Second)
			const total = 1 << 20
			st, err := client.StreamingInputCall(ctx)
			if err != nil {
				t.Fatal(err)
			}
			body := make([]byte, 16<<10)
			for sent := 0; sent < total; sent += len(body) {
				if err := st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: body}}); err != nil {
					break
				}
			}
			resp, err := st.CloseAndRecv()
			if err != nil || resp.GetAggregatedPayloadSize() != total {
				t.Errorf("upload whose first backend never took it: %v, %d bytes at the second, want %d", err, resp.GetAggregatedPayloadSize(), total)
			}
			testkit.WaitFor(ctx, t, "nothing held", func() bool {
				return srv.ClientStreams() == 0 && srv.MaxBufferedBytes() == 0 && srv.MaxHeldBytes() == 0
			})
		})
	}
}
