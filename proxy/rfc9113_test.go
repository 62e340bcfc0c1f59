package proxy_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/proxy"
)

// The tables here put RFC 9113's stream-state rules (§3.4, §4.2, §5.1,
// §5.1.1, §6.1, §6.4, §6.9, §8.4) on the wire against both roles of the
// proxy: as a server, to a raw client, and as a client, to a raw backend.
// Each row writes its frames, then a PING, and reads what the proxy
// answers before the PING's ack: a GOAWAY, a RST_STREAM on the row's
// stream, or nothing ("ignored"). A reset must be the only answer: the
// frames that follow on a stream we reset are ignored.

// rfcPing is the PING that closes each row's frames.
var rfcPing = [8]byte{'r', 'f', 'c', '9', '1', '1', '3'}

// answer reads frames until fr's peer answers on stream id (RST_STREAM),
// ends the connection (GOAWAY), or acks rfcPing, and says which.
func answer(fr *http2.Framer, id uint32) string {
	s, _ := answerGoAway(fr, id)
	return s
}

// answerGoAway is answer, with the last-stream-id of the GOAWAY if that was
// the answer.
func answerGoAway(fr *http2.Framer, id uint32) (string, uint32) {
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return fmt.Sprintf("read error %v", err), 0
		}
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			return "GOAWAY " + f.ErrCode.String(), f.LastStreamID
		case *http2.RSTStreamFrame:
			if f.StreamID == id {
				return "RST_STREAM " + f.ErrCode.String(), 0
			}
		case *http2.PingFrame:
			if f.IsAck() && f.Data == rfcPing {
				return "ignored", 0
			}
		}
	}
}

const unaryPath = "/grpc.testing.TestService/UnaryCall"

// TestRFC9113ClientSide: frames from a client on streams in every §5.1
// state, and the connection-level rules, each answered as the RFC says;
// a connection that took only a stream error goes on serving, and a good
// client beside them all sees no error.
func TestRFC9113ClientSide(t *testing.T) {
	verifyNoLeaks(t)
	// A small stream limit, for the §5.1.2 row; the others use two at most.
	const maxStreams = 4
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.MaxConcurrentStreams = maxStreams }})
	good := startGoodClient(t, e)
	msg := grpcMsg(&testgrpc.SimpleRequest{ResponseSize: 10})
	// call completes a unary call on id: afterwards the stream is closed.
	call := func(r *rawConn, id uint32) {
		r.headers(id, unaryPath, false)
		r.fr.WriteData(id, true, msg)
		r.next(func(f http2.Frame) bool {
			h, ok := f.(*http2.MetaHeadersFrame)
			return ok && h.StreamID == id && h.StreamEnded()
		})
	}
	tests := []struct {
		name       string
		noSettings bool           // skip the SETTINGS frame of the preface
		setup      func(*rawConn) // frames whose answer is not the row's
		frames     func(*rawConn)
		id         uint32 // the stream whose RST_STREAM is the answer
		want       string
	}{
		{
			name:   "§5.1 idle: RST_STREAM (§6.4)",
			frames: func(r *rawConn) { r.fr.WriteRSTStream(5, http2.ErrCodeCancel) },
			id:     5, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name:   "§5.1 idle: WINDOW_UPDATE (§6.9)",
			frames: func(r *rawConn) { r.fr.WriteWindowUpdate(5, 1) },
			id:     5, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name:   "§5.1 idle: DATA (§6.1)",
			frames: func(r *rawConn) { r.fr.WriteData(5, true, msg) },
			id:     5, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name:   "§5.1.1 DATA on an even id below the client's last (we never push)",
			setup:  func(r *rawConn) { call(r, 3) },
			frames: func(r *rawConn) { r.fr.WriteData(2, false, msg) },
			id:     2, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name:   "§5.1.1 HEADERS on an even id",
			frames: func(r *rawConn) { r.headers(2, unaryPath, true) },
			id:     2, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name:   "§5.1.1 HEADERS on a closed stream: ids must increase",
			setup:  func(r *rawConn) { call(r, 1) },
			frames: func(r *rawConn) { r.headers(1, unaryPath, true) },
			id:     1, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name:   "§5.1.1 HEADERS on a never-used id below the highest opened",
			setup:  func(r *rawConn) { call(r, 5) },
			frames: func(r *rawConn) { r.headers(3, unaryPath, true) },
			id:     3, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name: "§5.1 half-closed (remote): HEADERS after END_STREAM",
			frames: func(r *rawConn) {
				r.headers(1, unaryPath, true)
				r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, EndStream: true, BlockFragment: hpackBlock("x-trailer", "v")})
			},
			id: 1, want: "RST_STREAM STREAM_CLOSED",
		},
		{
			name: "§8.1 request trailers without END_STREAM",
			frames: func(r *rawConn) {
				r.headers(1, unaryPath, false)
				r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: hpackBlock("x-trailer", "v")})
			},
			id: 1, want: "RST_STREAM PROTOCOL_ERROR",
		},
		{
			name: "§5.1.2 a stream over SETTINGS_MAX_CONCURRENT_STREAMS",
			setup: func(r *rawConn) {
				for id := uint32(1); id < 2*maxStreams; id += 2 {
					r.headers(id, unaryPath, false)
				}
			},
			frames: func(r *rawConn) {
				r.headers(2*maxStreams+1, unaryPath, false)
				for id := uint32(1); id < 2*maxStreams; id += 2 {
					r.fr.WriteRSTStream(id, http2.ErrCodeCancel) // room for the next rows' call
				}
			},
			id: 2*maxStreams + 1, want: "RST_STREAM REFUSED_STREAM",
		},
		{
			name: "§5.1 half-closed (remote): DATA after END_STREAM (§6.1)",
			frames: func(r *rawConn) {
				r.headers(1, unaryPath, true)
				r.fr.WriteData(1, false, msg)
			},
			id: 1, want: "RST_STREAM STREAM_CLOSED",
		},
		{
			name:   "§5.1 closed: DATA (§6.1)",
			setup:  func(r *rawConn) { call(r, 1) },
			frames: func(r *rawConn) { r.fr.WriteData(1, false, msg) },
			id:     1, want: "RST_STREAM STREAM_CLOSED",
		},
		{
			name:   "§5.1 closed: RST_STREAM is ignored",
			setup:  func(r *rawConn) { call(r, 1) },
			frames: func(r *rawConn) { r.fr.WriteRSTStream(1, http2.ErrCodeCancel) },
			id:     1, want: "ignored",
		},
		{
			name:   "§5.1 closed: WINDOW_UPDATE is ignored",
			setup:  func(r *rawConn) { call(r, 1) },
			frames: func(r *rawConn) { r.fr.WriteWindowUpdate(1, 100) },
			id:     1, want: "ignored",
		},
		{
			name: "§5.1 closed after our RST_STREAM: the client's frames in flight are ignored",
			setup: func(r *rawConn) {
				// Not gRPC: answered and reset (NO_ERROR) while the
				// client still sends.
				r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: hpackBlock(
					":method", "POST", ":scheme", "http", ":path", unaryPath, ":authority", "x", "content-type", "text/plain")})
				r.next(func(f http2.Frame) bool { rst, ok := f.(*http2.RSTStreamFrame); return ok && rst.StreamID == 1 })
			},
			frames: func(r *rawConn) {
				r.fr.WriteData(1, false, msg)
				r.fr.WriteWindowUpdate(1, 100)
				r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, EndStream: true, BlockFragment: hpackBlock("x-trailer", "v")})
			},
			id: 1, want: "ignored",
		},
		{
			name:   "§5.3.1 PRIORITY on a stream depending on itself",
			setup:  func(r *rawConn) { r.headers(1, unaryPath, false) },
			frames: func(r *rawConn) { r.fr.WritePriority(1, http2.PriorityParam{StreamDep: 1, Weight: 15}) },
			id:     1, want: "RST_STREAM PROTOCOL_ERROR",
		},
		{
			name: "§5.3.1 HEADERS depending on itself; the client's DATA that follows is ignored",
			frames: func(r *rawConn) {
				r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: requestBlock(unaryPath), EndHeaders: true,
					Priority: http2.PriorityParam{StreamDep: 1, Weight: 15}})
				r.fr.WriteData(1, true, msg)
			},
			id: 1, want: "RST_STREAM PROTOCOL_ERROR",
		},
		{
			name:       "§3.4 the first frame is not SETTINGS",
			noSettings: true,
			frames:     func(r *rawConn) { r.headers(1, unaryPath, true) },
			id:         1, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name: "§4.2 a frame over SETTINGS_MAX_FRAME_SIZE",
			frames: func(r *rawConn) {
				r.headers(1, unaryPath, false)
				r.fr.WriteRawFrame(http2.FrameData, 0, 1, make([]byte, 16384+1))
			},
			id: 1, want: "GOAWAY FRAME_SIZE_ERROR",
		},
		// Whole single-frame blocks are read straight from the read buffer
		// (frameloop.go bufferedFrame, takeHeaders); these hold that path to the
		// Framer's rules.
		{
			name: "§6.10 CONTINUATION after a block that ended in its HEADERS",
			frames: func(r *rawConn) {
				r.headers(1, unaryPath, false)
				r.fr.WriteContinuation(1, true, hpackBlock("x-more", "v"))
			},
			id: 1, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name: "§6.2 HEADERS on stream 0",
			frames: func(r *rawConn) {
				r.fr.WriteRawFrame(http2.FrameHeaders, http2.FlagHeadersEndHeaders, 0, requestBlock(unaryPath))
			},
			id: 1, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name: "§4.2 a HEADERS frame over SETTINGS_MAX_FRAME_SIZE",
			frames: func(r *rawConn) {
				r.fr.WriteRawFrame(http2.FrameHeaders, http2.FlagHeadersEndHeaders, 1, append(requestBlock(unaryPath), make([]byte, 16384)...))
			},
			id: 1, want: "GOAWAY FRAME_SIZE_ERROR",
		},
		{
			name: "§8.2.1 an upper-case field name in a one-frame block",
			frames: func(r *rawConn) {
				r.fr.WriteRawFrame(http2.FrameHeaders, http2.FlagHeadersEndHeaders, 1, requestBlock(unaryPath, "X-Upper", "v"))
			},
			id: 1, want: "RST_STREAM PROTOCOL_ERROR",
		},
		{
			name: "§5.1 HEADERS of a new stream inside another's open block",
			frames: func(r *rawConn) {
				r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: requestBlock(unaryPath), EndHeaders: false})
				r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: requestBlock(unaryPath), EndHeaders: true})
			},
			id: 1, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name: "§8.4 PUSH_PROMISE from a client",
			frames: func(r *rawConn) {
				r.fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: requestBlock(unaryPath), EndHeaders: true})
			},
			id: 1, want: "GOAWAY PROTOCOL_ERROR",
		},
		// DATA on stream 0, and PING and WINDOW_UPDATE, are handled from
		// the read buffer too (frameloop.go plainControl): held to the
		// Framer's rules.
		{
			name:   "§6.1 DATA on stream 0",
			frames: func(r *rawConn) { r.fr.WriteRawFrame(http2.FrameData, 0, 0, msg) },
			id:     1, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name:   "§6.7 PING on a stream",
			frames: func(r *rawConn) { r.fr.WriteRawFrame(http2.FramePing, 0, 1, make([]byte, 8)) },
			id:     1, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name:   "§6.7 PING of 7 bytes",
			frames: func(r *rawConn) { r.fr.WriteRawFrame(http2.FramePing, 0, 0, make([]byte, 7)) },
			id:     1, want: "GOAWAY FRAME_SIZE_ERROR",
		},
		{
			name:   "§6.9 WINDOW_UPDATE of 5 bytes",
			frames: func(r *rawConn) { r.fr.WriteRawFrame(http2.FrameWindowUpdate, 0, 0, []byte{0, 0, 0, 1, 0}) },
			id:     1, want: "GOAWAY FRAME_SIZE_ERROR",
		},
		{
			name:   "§6.9 WINDOW_UPDATE of 0 on the connection",
			frames: func(r *rawConn) { r.fr.WriteRawFrame(http2.FrameWindowUpdate, 0, 0, []byte{0x80, 0, 0, 0}) },
			id:     1, want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name:   "§6.9 WINDOW_UPDATE of 0 on a stream",
			setup:  func(r *rawConn) { r.headers(1, unaryPath, false) },
			frames: func(r *rawConn) { r.fr.WriteRawFrame(http2.FrameWindowUpdate, 0, 1, []byte{0, 0, 0, 0}) },
			id:     1, want: "RST_STREAM PROTOCOL_ERROR",
		},
		{
			name:   "§6.9.1 a connection window over 2^31-1",
			frames: func(r *rawConn) { r.fr.WriteWindowUpdate(0, 1<<31-1) },
			id:     1, want: "GOAWAY FLOW_CONTROL_ERROR",
		},
		{
			name:   "§6.9.1 a stream window over 2^31-1",
			setup:  func(r *rawConn) { r.headers(1, unaryPath, false) },
			frames: func(r *rawConn) { r.fr.WriteWindowUpdate(1, 1<<31-1) },
			id:     1, want: "RST_STREAM FLOW_CONTROL_ERROR",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var r *rawConn
			if tc.noSettings {
				r = dialRawPreface(t, e.addr)
			} else {
				r = dialRaw(t, e.addr)
			}
			r.fr.AllowIllegalWrites = true
			if tc.setup != nil {
				tc.setup(r)
			}
			tc.frames(r)
			r.fr.WritePing(false, rfcPing)
			if got := answer(r.fr, tc.id); got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
			if strings.HasPrefix(tc.want, "RST_STREAM") {
				// One answer only: what the client sent after the frame
				// that cost the stream is ignored (§5.1).
				if got := answer(r.fr, tc.id); got != "ignored" {
					t.Fatalf("after the reset: got %s, want ignored", got)
				}
			}
			if !strings.HasPrefix(tc.want, "GOAWAY") {
				call(r, 101) // the connection goes on
			}
		})
	}
	good.check(t)
}

// TestRFC9113BackendSide: frames from a backend, answering a call on a
// raw backend, on streams in every §5.1 state, and the connection-level
// rules, each answered as the RFC says. The call ends within its
// deadline, whatever it ends with, and the proxy goes on serving.
func TestRFC9113BackendSide(t *testing.T) {
	verifyNoLeaks(t)
	resp := hpackBlock(":status", "200", "content-type", "application/grpc")
	trailers := hpackBlock("grpc-status", "0")
	msg := grpcMsg(&testgrpc.SimpleResponse{})
	tests := []struct {
		name      string
		atConnect bool // frames go right after the preface, before SETTINGS
		cancel    bool // frames go after the proxy reset the stream for a cancelled call
		frames    func(fr *http2.Framer, id uint32)
		want      string
	}{
		{
			name:   "§5.1 idle: DATA on a stream we never opened (§6.1)",
			frames: func(fr *http2.Framer, id uint32) { fr.WriteData(id+2, false, msg) },
			want:   "GOAWAY PROTOCOL_ERROR",
		},
		{
			name:   "§5.1.1 DATA on an even stream",
			frames: func(fr *http2.Framer, id uint32) { fr.WriteData(2, false, msg) },
			want:   "GOAWAY PROTOCOL_ERROR",
		},
		{
			name: "§8.4 HEADERS on an even stream (a push we refused)",
			frames: func(fr *http2.Framer, id uint32) {
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 2, BlockFragment: resp, EndHeaders: true})
			},
			want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name:   "§5.1 idle: RST_STREAM (§6.4)",
			frames: func(fr *http2.Framer, id uint32) { fr.WriteRSTStream(id+2, http2.ErrCodeCancel) },
			want:   "GOAWAY PROTOCOL_ERROR",
		},
		{
			name:   "§5.1 idle: WINDOW_UPDATE (§6.9)",
			frames: func(fr *http2.Framer, id uint32) { fr.WriteWindowUpdate(id+2, 1) },
			want:   "GOAWAY PROTOCOL_ERROR",
		},
		{
			name: "§5.1 DATA after END_STREAM (§6.1)",
			frames: func(fr *http2.Framer, id uint32) {
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: resp, EndHeaders: true})
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: trailers, EndHeaders: true, EndStream: true})
				fr.WriteData(id, false, msg)
			},
			want: "RST_STREAM STREAM_CLOSED",
		},
		{
			name: "§5.1 closed: RST_STREAM is ignored",
			frames: func(fr *http2.Framer, id uint32) {
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: resp, EndHeaders: true})
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: trailers, EndHeaders: true, EndStream: true})
				fr.WriteRSTStream(id, http2.ErrCodeCancel)
			},
			want: "ignored",
		},
		{
			name:   "§5.1 closed after our RST_STREAM: the backend's frames in flight are ignored",
			cancel: true,
			frames: func(fr *http2.Framer, id uint32) {
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: resp, EndHeaders: true})
				fr.WriteData(id, false, msg)
				fr.WriteWindowUpdate(id, 100)
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: trailers, EndHeaders: true, EndStream: true})
			},
			want: "ignored",
		},
		{
			name:   "§8.1.1 DATA before the response HEADERS: a malformed response",
			frames: func(fr *http2.Framer, id uint32) { fr.WriteData(id, false, msg) },
			want:   "RST_STREAM PROTOCOL_ERROR",
		},
		{
			name: "§5.1 closed: HEADERS after END_STREAM",
			frames: func(fr *http2.Framer, id uint32) {
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: resp, EndHeaders: true})
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: trailers, EndHeaders: true, EndStream: true})
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: trailers, EndHeaders: true, EndStream: true})
			},
			want: "RST_STREAM STREAM_CLOSED",
		},
		{
			name: "§6.5.2 SETTINGS_ENABLE_PUSH=1 from a server",
			frames: func(fr *http2.Framer, id uint32) {
				fr.WriteSettings(http2.Setting{ID: http2.SettingEnablePush, Val: 1})
			},
			want: "GOAWAY PROTOCOL_ERROR",
		},
		{
			name: "§5.3.1 HEADERS depending on itself",
			frames: func(fr *http2.Framer, id uint32) {
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: resp, EndHeaders: true,
					Priority: http2.PriorityParam{StreamDep: id, Weight: 15}})
			},
			want: "RST_STREAM PROTOCOL_ERROR",
		},
		{
			name:      "§3.4 the first frame is not SETTINGS",
			atConnect: true,
			frames:    func(fr *http2.Framer, id uint32) { fr.WritePing(false, [8]byte{1}) },
			want:      "GOAWAY PROTOCOL_ERROR",
		},
		{
			name: "§4.2 a frame over SETTINGS_MAX_FRAME_SIZE",
			frames: func(fr *http2.Framer, id uint32) {
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: resp, EndHeaders: true})
				fr.WriteRawFrame(http2.FrameData, 0, id, make([]byte, 16384+1))
			},
			want: "GOAWAY FRAME_SIZE_ERROR",
		},
		{
			name: "§8.4 PUSH_PROMISE",
			frames: func(fr *http2.Framer, id uint32) {
				fr.WritePushPromise(http2.PushPromiseParam{StreamID: id, PromiseID: 2, BlockFragment: resp, EndHeaders: true})
			},
			want: "GOAWAY PROTOCOL_ERROR",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := make(chan string, 1)
			opened := make(chan struct{})
			raw := rawBackend(t, func(nc net.Conn) {
				nc.SetDeadline(time.Now().Add(10 * time.Second))
				s, err := acceptH2(nc)
				if err != nil {
					return
				}
				s.buffered()
				s.fr.AllowIllegalWrites = true
				finish := func(id uint32) {
					s.fr.WritePing(false, rfcPing)
					s.flush()
					a, last := answerGoAway(s.fr, id)
					if last != 0 {
						// RFC 9113 §6.8: the last-stream-id is the
						// last stream the PEER initiated that we
						// acted on; a backend initiates none (we
						// refuse pushes), so it is 0, as x/net's and
						// grpc-go's clients send.
						a += fmt.Sprintf(" with last-stream-id %d", last)
					}
					select {
					case got <- a:
					default:
					}
				}
				if tc.atConnect {
					tc.frames(s.fr, 0)
					finish(0)
					return
				}
				s.hello()
				s.serve(func(f http2.Frame) bool {
					// The frames go once the request is complete (its
					// DATA with END_STREAM): a complete answer to an
					// unfinished request makes the proxy cancel the
					// backend's stream (RFC 9113 §8.1), which would
					// answer before the frames under test. For a
					// cancelled call, once its HEADERS are in.
					var id uint32
					switch f := f.(type) {
					case *http2.HeadersFrame:
						if !tc.cancel {
							return true
						}
						id = f.StreamID
					case *http2.DataFrame:
						if tc.cancel || !f.StreamEnded() {
							return true
						}
						id = f.StreamID
					default:
						return true
					}
					if tc.cancel {
						close(opened)
						for {
							f, err := s.fr.ReadFrame()
							if err != nil {
								return false
							}
							if rst, ok := f.(*http2.RSTStreamFrame); ok && rst.StreamID == id {
								break
							}
						}
					}
					tc.frames(s.fr, id)
					finish(id)
					return false
				})
			})
			fe := newFuzzEnv(t, raw)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			called := make(chan struct{})
			go func() {
				defer close(called)
				fe.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
			}()
			if tc.cancel {
				select {
				case <-opened:
					cancel()
				case <-time.After(5 * time.Second):
					t.Fatal("the backend got no request")
				}
			}
			select {
			case g := <-got:
				if g != tc.want {
					t.Errorf("got %s, want %s", g, tc.want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the raw backend saw no answer")
			}
			select {
			case <-called:
			case <-time.After(5 * time.Second):
				t.Fatal("the call did not end within its deadline")
			}
			fe.healthy(t)
		})
	}
}
