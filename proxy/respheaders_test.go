package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// TestResponseHeaderBlocks sends a backend's answer as header blocks in
// the order RFC 9113 §8.1 allows, or not: up to five informational (1xx)
// blocks, the final headers, DATA and trailers pass; a HEADERS frame
// without END_STREAM after the final headers, or a sixth 1xx block, makes
// the response malformed, and the client gets INTERNAL. Relayed, repeated
// blocks were queued toward the client without bound (the attack that
// found it: 250-byte blocks of references to a 4 KB table entry, each a
// megabyte decoded and held, 127 MiB of RSS for 2.5 MB sent). The proxy
// resets the backend's stream PROTOCOL_ERROR and keeps serving.
func TestResponseHeaderBlocks(t *testing.T) {
	final := hpackBlock(":status", "200", "content-type", "application/grpc")
	interim := hpackBlock(":status", "100")
	trailers := hpackBlock("grpc-status", "0")
	empty := []byte{0, 0, 0, 0, 0} // a gRPC message: grpc.testing.Empty
	for _, tc := range []struct {
		name   string
		blocks [][]byte // header blocks sent without END_STREAM, in order
		only   []byte   // instead, the one header block of the answer, with END_STREAM
		want   codes.Code
		reset  bool // the backend must see RST_STREAM(PROTOCOL_ERROR)
	}{
		{name: "final headers", blocks: [][]byte{final}, want: codes.OK},
		{name: "five informational, then final", blocks: [][]byte{interim, interim, interim, interim, interim, final}, want: codes.OK},
		{name: "six informational", blocks: [][]byte{interim, interim, interim, interim, interim, interim, final}, want: codes.Internal, reset: true},
		{name: "headers after the final headers", blocks: [][]byte{final, final}, want: codes.Internal, reset: true},
		{name: "101", blocks: [][]byte{hpackBlock(":status", "101"), final}, want: codes.Internal, reset: true},
		{name: "1xx ending the stream", only: hpackBlock(":status", "103"), want: codes.Internal, reset: true},
		{name: "a hundred blocks after the final headers", blocks: append([][]byte{final}, repeatBlock(hpackBlock("x-more", "y"), 100)...), want: codes.Internal, reset: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{backends: 1})
			var resets atomic.Int32
			bad := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
				switch f := f.(type) {
				case *http2.RSTStreamFrame:
					if f.ErrCode == http2.ErrCodeProtocol {
						resets.Add(1)
					}
				case *http2.HeadersFrame:
					id := f.StreamID
					if tc.only != nil {
						return s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: tc.only, EndHeaders: true, EndStream: true}) == nil
					}
					for _, b := range tc.blocks {
						if s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: b, EndHeaders: true}) != nil {
							return false
						}
					}
					if s.fr.WriteData(id, false, empty) != nil {
						return false
					}
					return s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: trailers, EndHeaders: true, EndStream: true}) == nil
				}
				return true
			}))
			e.setBackends(bad)
			ctx := testkit.Context(t, 30*time.Second)
			for i := range 3 {
				_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{})
				if got := status.Code(err); got != tc.want {
					t.Fatalf("call %d: %v, want %v", i, err, tc.want)
				}
			}
			if tc.reset {
				// The RST follows the client's status; give it a moment.
				deadline := time.Now().Add(5 * time.Second)
				for resets.Load() < 3 && time.Now().Before(deadline) {
					time.Sleep(10 * time.Millisecond)
				}
				if n := resets.Load(); n < 3 {
					t.Errorf("the backend saw %d RST_STREAM(PROTOCOL_ERROR) for 3 malformed answers", n)
				}
			}
			// The proxy still serves, through a good backend.
			e.setBackends(e.backends[0].Addr())
			if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Errorf("after the backend's answers: %v", err)
			}
		})
	}
}

func repeatBlock(b []byte, n int) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		out[i] = b
	}
	return out
}

// TestPaddingOnlyDataCredited has a backend fill its stream's window with
// DATA frames that carry only padding: the padding is returned with
// WINDOW_UPDATE (RFC 9113 §6.9.1 counts it), so the backend can then send
// its message. The proxy credited it but, the frame being empty, did not
// wake its writer, and the WINDOW_UPDATE waited for something else to
// write: the backend stalled on its window and the call ran into its
// deadline.
func TestPaddingOnlyDataCredited(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	final := hpackBlock(":status", "200", "content-type", "application/grpc")
	trailers := hpackBlock("grpc-status", "0")
	pad := make([]byte, 255)
	bad := rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		// The proxy's initial window per backend stream is 16 KiB
		// (BackendStreamWindow): 64 frames of 256 bytes fill it.
		credit := map[uint32]uint32{}
		s.serve(func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.HeadersFrame:
				id := f.StreamID
				credit[id] = 0
				if s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: final, EndHeaders: true}) != nil {
					return false
				}
				for range 64 {
					if s.fr.WriteDataPadded(id, false, nil, pad) != nil {
						return false
					}
				}
			case *http2.WindowUpdateFrame:
				got, ok := credit[f.StreamID]
				if !ok || got >= 5 {
					return true
				}
				credit[f.StreamID] = got + f.Increment
				if got+f.Increment >= 5 {
					id := f.StreamID
					return s.fr.WriteData(id, false, []byte{0, 0, 0, 0, 0}) == nil &&
						s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: trailers, EndHeaders: true, EndStream: true}) == nil
				}
			}
			return true
		})
	})
	e.setBackends(bad)
	ctx := testkit.Context(t, 30*time.Second)
	for i := range 3 {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := e.client.EmptyCall(cctx, &testgrpc.Empty{})
		cancel()
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
}

// TestEarlyAnswerEndsRequest: a backend that answers completely while the
// client is still sending its request, without resetting its stream
// (RFC 9113 §8.1 lets a server do either), leaves the proxy to end the
// request: the client gets the answer, then RST_STREAM(NO_ERROR), and the
// backend's stream is cancelled. Without it both streams stayed open for
// as long as the client kept sending nothing, and the idle checks skipped
// them.
func TestEarlyAnswerEndsRequest(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	final := hpackBlock(":status", "200", "content-type", "application/grpc")
	trailers := hpackBlock("grpc-status", "0")
	backendReset := make(chan http2.ErrCode, 4)
	bad := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.HeadersFrame:
			id := f.StreamID
			return s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: final, EndHeaders: true}) == nil &&
				s.fr.WriteData(id, false, grpcMsg(&testgrpc.Empty{})) == nil &&
				s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: trailers, EndHeaders: true, EndStream: true}) == nil
		case *http2.RSTStreamFrame:
			select {
			case backendReset <- f.ErrCode:
			default:
			}
		}
		return true
	}))
	e.setBackends(bad)
	r := dialRaw(t, e.addr)
	// The request's HEADERS, no END_STREAM, and nothing more.
	r.headers(1, "/grpc.testing.TestService/EmptyCall", false)
	var status string
	f := r.next(func(f http2.Frame) bool {
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			if f.StreamEnded() {
				status = field(f, "grpc-status")
			}
		case *http2.RSTStreamFrame:
			return f.StreamID == 1
		}
		return false
	})
	if rst := f.(*http2.RSTStreamFrame); status != "0" || rst.ErrCode != http2.ErrCodeNo {
		t.Errorf("client got grpc-status %q then RST_STREAM %v, want 0 then NO_ERROR", status, rst.ErrCode)
	}
	select {
	case code := <-backendReset:
		if code != http2.ErrCodeCancel {
			t.Errorf("backend's stream reset %v, want CANCEL", code)
		}
	case <-time.After(10 * time.Second):
		t.Error("the backend's stream was not reset")
	}
	// The connection serves on.
	r.headers(3, "/grpc.testing.TestService/EmptyCall", false)
	r.fr.WriteData(3, true, grpcMsg(&testgrpc.Empty{}))
	r.next(func(f http2.Frame) bool {
		h, ok := f.(*http2.MetaHeadersFrame)
		return ok && h.StreamID == 3 && h.StreamEnded()
	})
}

// TestEarlyAnswerToQueuedUpload: a backend with no stream window for the
// request (SETTINGS_INITIAL_WINDOW_SIZE 0) and one stream at a time
// answers each upload completely as soon as its HEADERS arrive, and never
// reads it. The client sent its whole request; what the proxy queued for
// the backend can never go. The proxy must reset the backend's stream
// (CANCEL), so the slot comes back: five calls in a row on one backend
// connection all succeed. The stream stayed open on the backend
// connection forever, its slot held, and every later call failed
// (attack round 4).
func TestEarlyAnswerToQueuedUpload(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.MaxBackendConns = 1 }})
	final := hpackBlock(":status", "200", "content-type", "application/grpc")
	trailers := hpackBlock("grpc-status", "0")
	var resets atomic.Int32
	bad := rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0},
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 1}) != nil {
			return
		}
		s.serve(func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.HeadersFrame:
				id := f.StreamID
				return s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: final, EndHeaders: true}) == nil &&
					s.fr.WriteData(id, false, grpcMsg(&testgrpc.StreamingInputCallResponse{AggregatedPayloadSize: 7})) == nil &&
					s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: trailers, EndHeaders: true, EndStream: true}) == nil
			case *http2.RSTStreamFrame:
				if f.ErrCode == http2.ErrCodeCancel {
					resets.Add(1)
				}
			}
			return true
		})
	})
	e.setBackends(bad)
	ctx := testkit.Context(t, 30*time.Second)
	const calls = 5
	for i := range calls {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		st, err := e.client.StreamingInputCall(cctx)
		if err == nil {
			for range 10 {
				if err = st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, 10000)}}); err != nil {
					break
				}
			}
		}
		var resp *testgrpc.StreamingInputCallResponse
		if err == nil || err == io.EOF {
			resp, err = st.CloseAndRecv()
		}
		cancel()
		if err != nil || resp.GetAggregatedPayloadSize() != 7 {
			t.Fatalf("call %d: %v %v, want the backend's answer", i, resp, err)
		}
	}
	testkit.WaitFor(ctx, t, "the backend's streams reset with CANCEL", func() bool { return resets.Load() == calls })
}

// TestEarlyAnswerSlotFreedFirst: a backend with one stream slot
// (SETTINGS_MAX_CONCURRENT_STREAMS 1, one connection) that answers each
// call completely before reading its request. The proxy resets the
// backend's stream to free the slot; a client that has the answer sends
// its next call at once, and that call must find the slot free. The slot
// was given back only after the answer had been queued toward the client,
// so now and then the next call found the only connection full and failed
// UNAVAILABLE "every connection is at its stream limit". A hook holds the
// reset back for a moment after the answer, so the next call arrives in
// between every time; with MaxStreamsPerBackend 1 too, its count must be
// given back as early.
func TestEarlyAnswerSlotFreedFirst(t *testing.T) {
	for _, perBackend := range []int64{0, 1} {
		t.Run(fmt.Sprintf("max streams per backend %d", perBackend), func(t *testing.T) {
			testEarlyAnswerSlotFreedFirst(t, perBackend)
		})
	}
}

func testEarlyAnswerSlotFreedFirst(t *testing.T, perBackend int64) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.MaxBackendConns = 1
		c.MaxStreamsPerBackend = perBackend
	}, hook: func(s *proxy.Server) {
		proxy.SetBeforeEarlyReset(s, func() { time.Sleep(20 * time.Millisecond) })
	}})
	final := hpackBlock(":status", "200", "content-type", "application/grpc")
	trailers := hpackBlock("grpc-status", "0")
	var resets atomic.Int32
	bad := rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0},
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 1}) != nil {
			return
		}
		msg := grpcMsg(&testgrpc.SimpleResponse{})
		s.serve(func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.HeadersFrame:
				id := f.StreamID
				return s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: final, EndHeaders: true}) == nil &&
					s.fr.WriteData(id, false, msg) == nil &&
					s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: trailers, EndHeaders: true, EndStream: true}) == nil
			case *http2.RSTStreamFrame:
				resets.Add(1)
			}
			return true
		})
	})
	e.setBackends(bad)
	ctx := testkit.Context(t, 60*time.Second)
	const calls = 20
	for i := range calls {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := e.client.UnaryCall(cctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: make([]byte, 100)}})
		cancel()
		if err != nil {
			t.Fatalf("call %d: %v, want the backend's answer", i, err)
		}
	}
	testkit.WaitFor(ctx, t, "the backend's streams reset", func() bool { return resets.Load() == calls })
}

// TestRefusedAfterAnswerStarted: a backend that sends its response
// headers, or headers and half a message, then RST_STREAM(REFUSED_STREAM)
// claims it did not process a stream it answered. Relayed as it was, the
// reset made grpc-go retry the call transparently, and the backend ran it
// twice (attack round 4). The client gets INTERNAL, and the backend sees
// the call once.
func TestRefusedAfterAnswerStarted(t *testing.T) {
	verifyNoLeaks(t)
	final := hpackBlock(":status", "200", "content-type", "application/grpc")
	for _, half := range []bool{false, true} {
		t.Run(fmt.Sprintf("half a message %v", half), func(t *testing.T) {
			e := newEnv(t, envOpts{backends: 1})
			var calls atomic.Int32
			bad := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
				h, ok := f.(*http2.HeadersFrame)
				if !ok {
					return true
				}
				calls.Add(1)
				if s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: h.StreamID, BlockFragment: final, EndHeaders: true}) != nil {
					return false
				}
				if half && s.fr.WriteData(h.StreamID, false, grpcMsg(&testgrpc.SimpleResponse{Payload: &testgrpc.Payload{Body: make([]byte, 100)}})[:50]) != nil {
					return false
				}
				return s.fr.WriteRSTStream(h.StreamID, http2.ErrCodeRefusedStream) == nil
			}))
			e.setBackends(bad)
			ctx := testkit.Context(t, 20*time.Second)
			_, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 100})
			if status.Code(err) != codes.Internal {
				t.Errorf("call: %v, want INTERNAL", err)
			}
			if n := calls.Load(); n != 1 {
				t.Errorf("the backend got the call %d times, want once", n)
			}
		})
	}
}

// TestEarlyRejectedUploads: uploads the backend rejects at once (client
// streams of 30 messages of 16 KB, x-fail-code 7) all end
// PERMISSION_DENIED on one client connection, as they do direct. The
// DATA the client had in flight after the proxy's RST_STREAM(NO_ERROR),
// and grpc-go's own RST_STREAM, arrive on streams the proxy has reset:
// counted as glitches, they spent the connection's budget in about 20
// uploads, and the connection was closed ENHANCE_YOUR_CALM, failing the
// calls on it UNAVAILABLE. Up to a stream window of them per reset
// stream is now ignored, as RFC 9113 §5.1 says.
func TestEarlyRejectedUploads(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	ctx := testkit.Context(t, 60*time.Second)
	msg := &testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, 16000)}}
	const workers, uploads = 8, 40
	var wg sync.WaitGroup
	var mu sync.Mutex
	got := map[string]int{}
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range uploads {
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				cctx = metadata.AppendToOutgoingContext(cctx, testserver.MetadataFailCode, "7")
				st, err := e.client.StreamingInputCall(cctx)
				if err == nil {
					for range 30 {
						if st.Send(msg) != nil {
							break
						}
					}
					_, err = st.CloseAndRecv()
				}
				cancel()
				k := status.Code(err).String()
				if status.Code(err) != codes.PermissionDenied {
					k += ": " + status.Convert(err).Message()
				}
				mu.Lock()
				got[k]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if got[codes.PermissionDenied.String()] != workers*uploads {
		t.Errorf("%d uploads rejected by the backend: %v, want all PermissionDenied", workers*uploads, got)
	}
}
