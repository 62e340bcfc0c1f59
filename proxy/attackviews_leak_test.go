package proxy_test

import (
	"context"
	"encoding/binary"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// scriptBackend is a raw backend that answers each call as its request's
// x-script header says, a comma-separated list of steps, each frame
// written (and flushed) alone after a short pause, so that the proxy's
// reader takes most of them in reads of their own:
//
//	hN     response HEADERS (application/grpc)
//	dN     a DATA frame of N payload bytes of the stream's script bytes
//	DN     the same with END_STREAM
//	pN:M   a DATA frame of N payload bytes with M bytes of padding
//	t      OK trailers (END_STREAM)
//	e      an empty DATA frame with END_STREAM
//	rN     RST_STREAM with code N
//	g      GOAWAY, then close the connection
//	c      close the connection
//	s      stall: nothing more
//	+x     step x, written right behind the previous one (no pause)
//
// The payload bytes are those of payloadOf(id, total): what the stream's
// DATA frames carry, in order.
func scriptBackend(t testing.TB, body func(id uint32) []byte) string {
	return rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		s.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		var mu sync.Mutex
		s.serve(func(f http2.Frame) bool {
			h, ok := f.(*http2.MetaHeadersFrame)
			if !ok {
				return true
			}
			var script string
			for _, hf := range h.RegularFields() {
				if hf.Name == "x-script" {
					script = hf.Value
				}
			}
			id := h.StreamID
			data := body(id)
			go func() {
				off := 0
				for _, step := range strings.Split(script, ",") {
					if step == "" {
						continue
					}
					if step[0] == '+' {
						step = step[1:] // no pause: written right behind the last
					} else {
						time.Sleep(2 * time.Millisecond)
					}
					mu.Lock()
					arg := step[1:]
					switch step[0] {
					case 'h':
						writeGRPCHeaders(s.fr, id)
					case 'd', 'D':
						n, _ := strconv.Atoi(arg)
						s.fr.WriteData(id, step[0] == 'D', data[off:off+n])
						off += n
					case 'p':
						a, b, _ := strings.Cut(arg, ":")
						n, _ := strconv.Atoi(a)
						pad, _ := strconv.Atoi(b)
						s.fr.WriteDataPadded(id, false, data[off:off+n], make([]byte, pad))
						off += n
					case 't':
						writeOKTrailers(s.fr, id)
					case 'e':
						s.fr.WriteData(id, true, nil)
					case 'r':
						c, _ := strconv.Atoi(arg)
						s.fr.WriteRSTStream(id, http2.ErrCode(c))
					case 'g':
						s.fr.WriteGoAway(id, http2.ErrCodeNo, nil)
						nc.Close()
					case 'c':
						nc.Close()
					}
					mu.Unlock()
				}
			}()
			return true
		})
	})
}

// grpcStream is n bytes of consecutive gRPC messages of the given body
// sizes (cycled), each body seeded by the stream id: the bytes a scripted
// stream carries.
func grpcStream(id uint32, n int, sizes ...int) []byte {
	var out []byte
	for i := 0; len(out) < n; i++ {
		m := seededMessage(uint64(id), i, sizes[i%len(sizes)])
		out = binary.BigEndian.AppendUint32(append(out, 0), uint32(len(m)))
		out = append(out, m...)
	}
	return out
}

func pickerTo(addr string) proxy.Picker {
	return proxy.PickerFunc(func(context.Context, string) (string, func(error), error) { return addr, nil, nil })
}

// scriptHeaders opens stream id with a request whose x-script header is
// script, and ends it with an empty gRPC message.
func (r *rawConn) scriptCall(id uint32, script string, extra ...string) {
	r.t.Helper()
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: requestBlock("/grpc.testing.TestService/StreamingOutputCall", append([]string{"x-script", script}, extra...)...), EndHeaders: true}); err != nil {
		r.t.Fatal(err)
	}
	r.fr.WriteData(id, true, make([]byte, 5))
}

// waitViewsFreed waits until no backend connection has a read buffer
// pinned and no client connection counts buffers.
func waitViewsFreed(t *testing.T, srv *proxy.Server, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if srv.PinnedReadBufs() == 0 && srv.MaxBufferedBytes() == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("%s: %d read buffers still pinned by views, %d bytes still counted in a client budget, 5 s after", what, srv.PinnedReadBufs(), srv.MaxBufferedBytes())
}

// TestAttackViewsFreedOnEveryEnd: views of the backend reader's buffer
// are queued toward a client that grants no window, or held back as an
// incomplete message; then the call ends every way it can. Every view must
// be freed: no read buffer stays pinned on the (live) backend connection,
// and no byte stays counted in the client connection's budget.
func TestAttackViewsFreedOnEveryEnd(t *testing.T) {
	verifyNoLeaks(t)
	queued := "h,d4096,d4096,d5000" // three whole messages of 4091 B, then part of one
	held := "h,d4100,d4200,d4300"   // the first 12600 B of a message of 65536
	addr := scriptBackend(t, func(id uint32) []byte {
		if id%4 == 3 { // held scripts go on odd pairs, see below
			return grpcStream(id, 1<<17, 65536)
		}
		return grpcStream(id, 1<<17, 4091)
	})
	cases := []struct {
		name string
		end  func(r *rawConn, id uint32, srv *proxy.Server)
		hdr  []string
	}{
		{"client RST_STREAM", func(r *rawConn, id uint32, _ *proxy.Server) { r.fr.WriteRSTStream(id, http2.ErrCodeCancel) }, nil},
		{"client closes its connection", func(r *rawConn, id uint32, _ *proxy.Server) { r.nc.Close() }, nil},
		{"deadline", func(r *rawConn, id uint32, _ *proxy.Server) { time.Sleep(600 * time.Millisecond) }, []string{"grpc-timeout", "300m"}},
		{"client GOAWAY and close", func(r *rawConn, id uint32, _ *proxy.Server) {
			r.fr.WriteGoAway(id, http2.ErrCodeNo, nil)
			r.nc.Close()
		}, nil},
		{"proxy shutdown", func(r *rawConn, id uint32, srv *proxy.Server) {
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			srv.Shutdown(ctx)
		}, nil},
	}
	for _, tc := range cases {
		for _, script := range []string{queued, held} {
			name := tc.name + "/queued"
			id := uint32(1)
			if script == held {
				name, id = tc.name+"/held", 3
			}
			t.Run(name, func(t *testing.T) {
				srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog})
				if err != nil {
					t.Fatal(err)
				}
				ln := serveProxy(t, srv)
				// A first call opens the backend connection, which the
				// pool keeps, so its reader's pinned count can be read.
				r0 := dialRawPreface(t, ln.Addr().String())
				r0.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
				r := dialRawPreface(t, ln.Addr().String())
				r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
				r.scriptCall(id, script, tc.hdr...)
				ctx := testkit.Context(t, 5*time.Second)
				testkit.WaitFor(ctx, t, "views", func() bool { return srv.PinnedReadBufs() > 0 && srv.MaxBufferedBytes() >= 12000 })
				time.Sleep(20 * time.Millisecond)
				tc.end(r, id, srv)
				waitViewsFreed(t, srv, name)
			})
		}
	}
}
