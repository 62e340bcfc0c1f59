package proxy_test

import (
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAttack8ResetCodesMidMessage: a backend sends its headers, two
// complete messages and half a third, then RST_STREAM with each code. The
// client through the proxy must see what a direct grpc-go client sees:
// the same messages and the same status code. (REFUSED_STREAM after an
// answer started is turned into INTERNAL_ERROR on purpose: backendReset.)
func TestAttack8ResetCodesMidMessage(t *testing.T) {
	verifyNoLeaks(t)
	msg := payloadMsg(3000)
	for _, code := range []http2.ErrCode{http2.ErrCodeNo, http2.ErrCodeProtocol, http2.ErrCodeFlowControl, http2.ErrCodeStreamClosed, http2.ErrCodeEnhanceYourCalm, http2.ErrCodeInadequateSecurity, http2.ErrCodeHTTP11Required, http2.ErrCode(0x77)} {
		t.Run(code.String(), func(t *testing.T) {
			bad := rawBackend(t, halfMessageH2(msg, 2, [8]byte{'r', 's', 't'}, func(s *h2Server, id uint32) bool {
				s.fr.WriteRSTStream(id, code)
				return true
			}))
			e := newEnv(t, envOpts{backends: 1})
			e.setBackends(bad)
			ctx := testkit.Context(t, 10*time.Second)
			direct := callRaw(ctx, e.dial(bad), false)
			got := callRaw(ctx, e.cc, false)
			if got.msgs != direct.msgs || got.code != direct.code {
				t.Errorf("through the proxy: %d messages then %v; direct: %d messages then %v", got.msgs, got.err, direct.msgs, direct.err)
			}
		})
	}
}
