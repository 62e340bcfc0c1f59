package proxy_test

import (
	"bytes"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAttack8InterimThenDies: a backend sends an informational 103 header
// block, then fails before its response headers: it closes the
// connection, or resets the stream. The client through the proxy must end
// as a direct grpc-go client does.
func TestAttack8InterimThenDies(t *testing.T) {
	verifyNoLeaks(t)
	for _, fault := range []string{"close", "rst"} {
		t.Run(fault, func(t *testing.T) {
			bad := rawBackend(t, pingedH2([8]byte{'i'}, func(s *h2Server, id uint32) {
				var hb bytes.Buffer
				hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: ":status", Value: "103"})
				s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true})
			}, func(s *h2Server, id uint32) bool {
				time.Sleep(50 * time.Millisecond)
				if fault == "rst" {
					s.fr.WriteRSTStream(id, http2.ErrCodeInternal)
					return true
				}
				return false
			}))
			e := newEnv(t, envOpts{backends: 1})
			e.setBackends(bad)
			ctx := testkit.Context(t, 10*time.Second)
			for _, unary := range []bool{true, false} {
				direct := callRaw(ctx, e.dial(bad), unary)
				got := callRaw(ctx, e.cc, unary)
				t.Logf("unary %v: direct %v; proxy %v", unary, direct.err, got.err)
				if got.code != direct.code {
					t.Errorf("unary %v: through the proxy: %v; direct: %v", unary, got.err, direct.err)
				}
			}
		})
	}
}
