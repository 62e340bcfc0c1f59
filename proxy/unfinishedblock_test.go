package proxy_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/proxy"
)

// TestFramesAfterUnfinishedBlock: a HEADERS frame without END_HEADERS
// must be followed by CONTINUATION frames of its stream; any other frame
// is a connection error PROTOCOL_ERROR (RFC 9113 §6.2, §6.10), which
// x/net's Framer (checkFrameOrder) reports even when the HEADERS frame
// itself was refused with a stream error (padding longer than its
// payload). The frames that follow must not be handled as if the block
// had ended: not a PING answered, not a new stream served.
func TestFramesAfterUnfinishedBlock(t *testing.T) {
	e := newEnv(t, envOpts{backends: 1})
	// HEADERS on stream 1, PADDED with a pad length over the payload,
	// no END_HEADERS: x/net's Framer returns a stream error for it, and
	// expects CONTINUATION on stream 1 next.
	bad := append([]byte{200}, requestBlock(unaryPath)...)
	for _, tc := range []struct {
		name string
		next func(r *rawConn)
		ok   bool // the block ends, and the PING after it is answered
	}{
		{"CONTINUATION, then PING", func(r *rawConn) {
			r.fr.WriteContinuation(1, true, nil)
			r.fr.WritePing(false, rfcPing)
		}, true},
		{"PING", func(r *rawConn) { r.fr.WritePing(false, rfcPing) }, false},
		{"WINDOW_UPDATE", func(r *rawConn) { r.fr.WriteWindowUpdate(0, 1); r.fr.WritePing(false, rfcPing) }, false},
		{"HEADERS of a new stream", func(r *rawConn) {
			r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: requestBlock(unaryPath), EndHeaders: true, EndStream: true})
			r.fr.WritePing(false, rfcPing)
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, e.addr)
			r.fr.AllowIllegalWrites = true
			r.nc.SetDeadline(time.Now().Add(5 * time.Second))
			// Writes the bad HEADERS and what follows in one write, as
			// a client's burst: the proxy reads them in one fill.
			var buf []byte
			w := &sliceWriter{&buf}
			fr := http2.NewFramer(w, nil)
			fr.AllowIllegalWrites = true
			fr.WriteRawFrame(http2.FrameHeaders, http2.FlagHeadersPadded, 1, bad)
			r2 := &rawConn{t: t, nc: r.nc, fr: fr}
			tc.next(r2)
			if _, err := r.nc.Write(buf); err != nil {
				t.Fatal(err)
			}
			var got []string
			for {
				f, err := r.fr.ReadFrame()
				if err != nil {
					got = append(got, fmt.Sprintf("read error %v", err))
					break
				}
				switch f := f.(type) {
				case *http2.GoAwayFrame:
					got = append(got, "GOAWAY "+f.ErrCode.String())
				case *http2.RSTStreamFrame:
					got = append(got, fmt.Sprintf("RST_STREAM %d %v", f.StreamID, f.ErrCode))
				case *http2.MetaHeadersFrame:
					got = append(got, fmt.Sprintf("HEADERS %d", f.StreamID))
				case *http2.PingFrame:
					if f.IsAck() && f.Data == rfcPing {
						got = append(got, "PING ack")
					}
				}
				if len(got) > 0 && (got[len(got)-1] == "PING ack" || got[len(got)-1][:6] == "GOAWAY") {
					break
				}
			}
			last := got[len(got)-1]
			if tc.ok {
				if last != "PING ack" {
					t.Errorf("answers %q, want the PING after the block's end answered", got)
				}
				return
			}
			if last != "GOAWAY PROTOCOL_ERROR" {
				t.Errorf("answers %q, want the connection to end with GOAWAY PROTOCOL_ERROR (§6.10)", got)
			}
			for _, g := range got {
				if g == "HEADERS 3" {
					t.Errorf("stream 3, opened inside stream 1's unfinished block, was served")
				}
			}
		})
	}
}

// TestBackendFramesAfterUnfinishedBlock is TestFramesAfterUnfinishedBlock's
// PING case from a backend: its answer's HEADERS without END_HEADERS,
// refused by the Framer with a stream error, then a PING, which must end
// the connection with GOAWAY(PROTOCOL_ERROR), not be answered.
func TestBackendFramesAfterUnfinishedBlock(t *testing.T) {
	got := make(chan string, 4)
	raw := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
		h, ok := f.(*http2.HeadersFrame)
		if !ok {
			if g, ok := f.(*http2.GoAwayFrame); ok {
				got <- "GOAWAY " + g.ErrCode.String()
				return false
			}
			if p, ok := f.(*http2.PingFrame); ok && p.IsAck() && p.Data == rfcPing {
				got <- "PING ack"
				return false
			}
			return true
		}
		s.fr.AllowIllegalWrites = true
		s.fr.WriteRawFrame(http2.FrameHeaders, http2.FlagHeadersPadded, h.StreamID, append([]byte{200}, hpackBlock(":status", "200")...))
		s.fr.WritePing(false, rfcPing)
		return true
	}))
	_, client := twoBackendProxy(t, raw, proxy.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
	select {
	case g := <-got:
		if g != "GOAWAY PROTOCOL_ERROR" {
			t.Fatalf("backend got %s", g)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the backend got neither GOAWAY nor its PING answered")
	}
}

type sliceWriter struct{ b *[]byte }

func (w *sliceWriter) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
