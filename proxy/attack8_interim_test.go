package proxy_test

import (
	"bytes"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAttack8InterimThenDiesMidMessage: a backend answers with an
// informational 103 header block, then its gRPC response headers, one
// complete message and half of the next, then closes its connection. The
// hold-back (holdback.go) must cover this response like any other gRPC
// response: the client gets the complete message, then UNAVAILABLE, not
// the INTERNAL ("unexpected EOF") of a torn message.
func TestAttack8InterimThenDiesMidMessage(t *testing.T) {
	verifyNoLeaks(t)
	msg := payloadMsg(3000)
	bad := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
		h, ok := f.(*http2.HeadersFrame)
		if !ok {
			return true
		}
		id := h.StreamID
		var hb bytes.Buffer
		hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: ":status", Value: "103"})
		s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true})
		writeGRPCHeaders(s.fr, id)
		s.fr.WriteData(id, false, msg)
		s.fr.WriteData(id, false, msg[:len(msg)/2])
		time.Sleep(100 * time.Millisecond)
		return false // closes the connection
	}))
	e := newEnv(t, envOpts{backends: 1})
	e.setBackends(bad)
	ctx := testkit.Context(t, 10*time.Second)
	got := callRaw(ctx, e.cc, false)
	direct := callRaw(ctx, e.dial(bad), false)
	t.Logf("direct: %d messages then %v", direct.msgs, direct.err)
	if got.msgs != 1 || got.code != codes.Unavailable {
		t.Errorf("through the proxy: %d messages then %v; want 1 then UNAVAILABLE", got.msgs, got.err)
	}
}
