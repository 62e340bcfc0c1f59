package proxy_test

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestAtk5ShutdownMidMessageIsReset: a backend is in the middle of a
// response message larger than the hold-back bound, so its first part
// went on to the client as it arrived and the proxy's queue toward the
// client is empty; the rest never comes. Server.Shutdown's drain runs
// out. The call must end with RST_STREAM (a status the client reads), not
// with trailers inside the message, which grpc-go's client reports as
// INTERNAL "unexpected EOF". The proxy checked only its queue for a
// message partly written, and found none when the queue was empty.
func TestAtk5ShutdownMidMessageIsReset(t *testing.T) {
	verifyNoLeaks(t)
	// A 1 MiB message, of which 200 KiB come.
	bad := tornBackend(t, nil, 1<<20, 200<<10)
	e := envBehind(t, bad, 512<<10)
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
	if err != nil {
		t.Fatal(err)
	}
	got := recvLater(st.Recv)
	// The client's 64 KiB initial windows grow with what it reads; let
	// the proxy write all it has.
	time.Sleep(300 * time.Millisecond)
	sctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := srv.Shutdown(sctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown: %v, want the deadline", err)
	}
	select {
	case err := <-got:
		s := status.Convert(err)
		if err == nil || errors.Is(err, io.EOF) || strings.Contains(s.Message(), "unexpected EOF") {
			t.Errorf("client: %v; want the call reset (RST_STREAM), not ended inside the message", err)
		}
		if s.Code() != codes.Internal && s.Code() != codes.Unavailable {
			t.Errorf("client: %v; want INTERNAL (RST_STREAM INTERNAL_ERROR) or UNAVAILABLE", err)
		}
		t.Logf("client: %v", err)
	case <-ctx.Done():
		t.Fatal("the call hung")
	}
}

// TestAtk5DeadlineMidMessageIsReset is TestAtk5ShutdownMidMessageIsReset
// for the call's own grpc-timeout passing in the proxy, seen by a raw
// client (a grpc-go client's own timer would fire first): the call ends
// with RST_STREAM(CANCEL), never with trailers after half a message.
func TestAtk5DeadlineMidMessageIsReset(t *testing.T) {
	verifyNoLeaks(t)
	bad := tornBackend(t, nil, 1<<20, 200<<10)
	e := envBehind(t, bad, 512<<10)
	r := dialRawWide(t, e.addr)
	block := requestBlock("/grpc.testing.TestService/StreamingOutputCall", "grpc-timeout", "300m")
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true, EndStream: true}); err != nil {
		t.Fatal(err)
	}
	data, headers := 0, 0
	for {
		fr, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading: %v (after %d DATA bytes)", err, data)
		}
		switch fr := fr.(type) {
		case *http2.DataFrame:
			data += len(fr.Data())
			if fr.StreamEnded() {
				t.Fatalf("END_STREAM on DATA after %d bytes of a %d-byte message", data, 5+1<<20)
			}
		case *http2.MetaHeadersFrame:
			headers++
			if fr.StreamEnded() {
				t.Fatalf("trailers %v after %d bytes of a %d-byte message; want RST_STREAM(CANCEL)", fr.Fields, data, 5+1<<20)
			}
		case *http2.RSTStreamFrame:
			if fr.ErrCode != http2.ErrCodeCancel {
				t.Errorf("RST_STREAM(%v), want CANCEL", fr.ErrCode)
			}
			if data == 0 {
				t.Errorf("no DATA before the reset: the test did not reach the case")
			}
			return
		case *http2.GoAwayFrame:
			t.Fatalf("GOAWAY %v", fr.ErrCode)
		}
	}
}

// TestAtk5ShutdownMidHeldMessage: the message in the middle is under the
// hold-back bound, so none of it went to the client: the expired drain
// ends the call with UNAVAILABLE trailers, after the complete message
// before it.
func TestAtk5ShutdownMidHeldMessage(t *testing.T) {
	verifyNoLeaks(t)
	whole := payloadMsg(1000)
	// A whole message, then a 100 KiB message of which 50 KiB come.
	bad := tornBackend(t, whole, 100<<10, 50<<10)
	e := envBehind(t, bad, 512<<10)
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 30*time.Second)
	st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatalf("the complete message: %v", err)
	}
	got := recvLater(st.Recv)
	time.Sleep(300 * time.Millisecond)
	sctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	srv.Shutdown(sctx)
	select {
	case err := <-got:
		if s := status.Convert(err); s.Code() != codes.Unavailable || !strings.Contains(s.Message(), "shutting down") {
			t.Errorf("client: %v; want UNAVAILABLE, shutting down", err)
		}
	case <-ctx.Done():
		t.Fatal("the call hung")
	}
}

// tornBackend is a raw HTTP/2 backend that answers every request with
// gRPC response headers, then before (the whole messages to come first;
// none if nil) in one DATA frame, then of a message of size bytes only its
// 5-byte prefix and part bytes, in DATA frames of at most 16 KiB. The rest
// never comes; the backend does not watch its windows.
func tornBackend(t *testing.T, before []byte, size, part int) string {
	return rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		s.serve(func(f http2.Frame) bool {
			if h, ok := f.(*http2.HeadersFrame); ok {
				writeGRPCHeaders(s.fr, h.StreamID)
				if before != nil {
					s.fr.WriteData(h.StreamID, false, before)
				}
				msg := make([]byte, 5+part)
				binary.BigEndian.PutUint32(msg[1:], uint32(size))
				for len(msg) > 0 {
					n := min(len(msg), 16384)
					s.fr.WriteData(h.StreamID, false, msg[:n])
					msg = msg[n:]
				}
			}
			return true
		})
	})
}
