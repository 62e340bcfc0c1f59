package proxy_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
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

// TestH2llUploadTrailersOnlyUnavailable: as TestH2llUploadBackendFailsMidStream,
// with a first backend that answers UNAVAILABLE trailers-only (no
// response headers before) after reading the first 16 KiB message, while
// the client pauses (retryable: the second backend must get the whole
// upload), or after reading 256 KiB (past the buffer: the client must get
// UNAVAILABLE).
func TestH2llUploadTrailersOnlyUnavailable(t *testing.T) {
	verifyNoLeaks(t)
	const msg = 16 << 10
	var failAfter atomic.Int64
	bad := serveRawGRPC(t, func(ss grpc.ServerStream) error {
		got := 0
		for got < int(failAfter.Load()) {
			var m []byte
			if err := ss.RecvMsg(&m); err != nil {
				return err
			}
			got += len(m)
		}
		return status.Error(codes.Unavailable, "bad: gone, trailers only")
	})
	good := serveRawGRPC(t, func(ss grpc.ServerStream) error {
		got := 0
		for {
			var m []byte
			err := ss.RecvMsg(&m)
			if errors.Is(err, io.EOF) {
				out := binary.BigEndian.AppendUint32(nil, uint32(got))
				return ss.SendMsg(&out)
			}
			if err != nil {
				return err
			}
			got += len(m)
		}
	})
	srv, err := proxy.New(proxy.Config{Picker: firstThenOthers{bad, good}, Logger: quietLog,
		RetryOn: []string{"/x.Y/"}})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	cc := e2eConn(t, ln.Addr().String())
	ctx := testkit.Context(t, 30*time.Second)
	for _, after := range []int{msg, 16 * msg} {
		t.Run(fmt.Sprintf("after %d KiB", after>>10), func(t *testing.T) {
			failAfter.Store(int64(after))
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			st, err := cc.NewStream(cctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}, "/x.Y/Up", grpc.ForceCodec(rawBytes{}))
			if err != nil {
				t.Fatal(err)
			}
			body := make([]byte, msg)
			const total = 64 * msg
			for sent := 0; sent < total; sent += msg {
				if sent == 2*msg {
					time.Sleep(100 * time.Millisecond)
				}
				if err := st.SendMsg(&body); err != nil {
					break
				}
			}
			st.CloseSend()
			var out []byte
			err = st.RecvMsg(&out)
			if after == msg {
				if err != nil || len(out) != 4 || binary.BigEndian.Uint32(out) != total {
					t.Errorf("trailers-only UNAVAILABLE within the retry buffer: %v (%x), want the second backend's count of %d", err, out, total)
				}
			} else if status.Code(err) != codes.Unavailable {
				t.Errorf("trailers-only UNAVAILABLE past the retry buffer: %v, want UNAVAILABLE", err)
			}
			testkit.WaitFor(ctx, t, "nothing held", func() bool {
				return srv.ClientStreams() == 0 && srv.MaxBufferedBytes() == 0 && srv.MaxHeldBytes() == 0
			})
		})
	}
}
