package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/codes"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAttack8GoAwayDisownsAnsweredStream: a backend answers with its
// headers, two complete messages and half a third (held back), then sends
// GOAWAY whose last stream id is below the call's (it claims it never
// processed it), and goes on sending the rest of the answer. The client
// must get the two messages, intact, then UNAVAILABLE: never the call run
// again elsewhere (its answer started), never a torn message.
func TestAttack8GoAwayDisownsAnsweredStream(t *testing.T) {
	verifyNoLeaks(t)
	msg := payloadMsg(3000)
	for _, code := range []http2.ErrCode{http2.ErrCodeNo, http2.ErrCodeInternal} {
		t.Run(code.String(), func(t *testing.T) {
			bad := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
				h, ok := f.(*http2.HeadersFrame)
				if !ok {
					return true
				}
				id := h.StreamID
				writeGRPCHeaders(s.fr, id)
				s.fr.WriteData(id, false, msg)
				s.fr.WriteData(id, false, msg)
				s.fr.WriteData(id, false, msg[:len(msg)/2])
				time.Sleep(50 * time.Millisecond)
				s.fr.WriteGoAway(0, code, nil)
				time.Sleep(50 * time.Millisecond)
				s.fr.WriteData(id, false, msg[len(msg)/2:])
				s.fr.WriteData(id, false, msg)
				writeOKTrailers(s.fr, id)
				time.Sleep(100 * time.Millisecond)
				return false
			}))
			e := newEnv(t, envOpts{backends: 1})
			e.setBackends(bad)
			ctx := testkit.Context(t, 10*time.Second)
			got := callRaw(ctx, e.cc, false)
			if got.msgs != 2 || got.code != codes.Unavailable {
				t.Errorf("through the proxy: %d messages then %v; want 2 then UNAVAILABLE", got.msgs, got.err)
			}
			direct := callRaw(ctx, e.dial(bad), false)
			t.Logf("direct: %d messages then %v", direct.msgs, direct.err)
		})
	}
}
