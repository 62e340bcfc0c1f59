package proxy_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
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
	const part = 200 << 10
	bad := rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		s.serve(func(f http2.Frame) bool {
			if h, ok := f.(*http2.HeadersFrame); ok {
				writeGRPCHeaders(s.fr, h.StreamID)
				// A 1 MiB message, of which part bytes come.
				msg := make([]byte, 5+part)
				binary.BigEndian.PutUint32(msg[1:], 1<<20)
				for len(msg) > 0 {
					n := min(len(msg), 16384)
					s.fr.WriteData(h.StreamID, false, msg[:n])
					msg = msg[n:]
				}
			}
			return true
		})
	})
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.BackendStreamWindow = 512 << 10 // the raw backend does not watch it
	}})
	srv := e.srv.(*proxy.Server)
	e.setBackends(bad)
	ctx := testkit.Context(t, 30*time.Second)
	st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		_, err := st.Recv()
		got <- err
	}()
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
	const part = 200 << 10
	bad := rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		s.serve(func(f http2.Frame) bool {
			if h, ok := f.(*http2.HeadersFrame); ok {
				writeGRPCHeaders(s.fr, h.StreamID)
				msg := make([]byte, 5+part)
				binary.BigEndian.PutUint32(msg[1:], 1<<20)
				for len(msg) > 0 {
					n := min(len(msg), 16384)
					s.fr.WriteData(h.StreamID, false, msg[:n])
					msg = msg[n:]
				}
			}
			return true
		})
	})
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.BackendStreamWindow = 512 << 10
	}})
	e.setBackends(bad)
	r := dialRawWide(t, e.addr)
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	f := []string{":method", "POST", ":scheme", "http", ":path", "/grpc.testing.TestService/StreamingOutputCall", ":authority", "x",
		"content-type", "application/grpc", "te", "trailers", "grpc-timeout", "300m"}
	for i := 0; i < len(f); i += 2 {
		enc.WriteField(hpack.HeaderField{Name: f[i], Value: f[i+1]})
	}
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: true}); err != nil {
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
	bad := rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		s.serve(func(f http2.Frame) bool {
			if h, ok := f.(*http2.HeadersFrame); ok {
				writeGRPCHeaders(s.fr, h.StreamID)
				s.fr.WriteData(h.StreamID, false, whole)
				// A 100 KiB message, of which 50 KiB come.
				msg := make([]byte, 5+50<<10)
				binary.BigEndian.PutUint32(msg[1:], 100<<10)
				for len(msg) > 0 {
					n := min(len(msg), 16384)
					s.fr.WriteData(h.StreamID, false, msg[:n])
					msg = msg[n:]
				}
			}
			return true
		})
	})
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.BackendStreamWindow = 512 << 10
	}})
	srv := e.srv.(*proxy.Server)
	e.setBackends(bad)
	ctx := testkit.Context(t, 30*time.Second)
	st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatalf("the complete message: %v", err)
	}
	got := make(chan error, 1)
	go func() {
		_, err := st.Recv()
		got <- err
	}()
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
