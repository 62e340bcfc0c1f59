package proxy_test

import (
	"bytes"
	"net"
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
			bad := rawBackend(t, func(nc net.Conn) {
				s, err := acceptH2(nc)
				if err != nil || s.hello() != nil {
					return
				}
				var id uint32
				s.serve(func(f http2.Frame) bool {
					switch f := f.(type) {
					case *http2.HeadersFrame:
						id = f.StreamID
						var hb bytes.Buffer
						hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: ":status", Value: "103"})
						s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true})
						s.fr.WritePing(false, [8]byte{'i'})
					case *http2.PingFrame:
						if f.IsAck() && f.Data == [8]byte{'i'} {
							time.Sleep(50 * time.Millisecond)
							if fault == "rst" {
								s.fr.WriteRSTStream(id, http2.ErrCodeInternal)
								return true
							}
							return false
						}
					}
					return true
				})
			})
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
