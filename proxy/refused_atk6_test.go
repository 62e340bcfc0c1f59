package proxy_test

import (
	"bytes"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestAtk6RefusedRequestsReported sends requests the proxy answers itself
// and compares the grpc-status it sent with the call it reported: one
// report each, with that code and, for a limit, its name. A malformed
// request (no :path) is reset with PROTOCOL_ERROR instead, which grpc-go's
// client reports as INTERNAL: so is the call.
func TestAtk6RefusedRequestsReported(t *testing.T) {
	big := strings.Repeat("x", 700)
	for _, tc := range []struct {
		name   string
		fields []string
		limit  string
	}{
		{name: "GET", fields: []string{":method", "GET", ":scheme", "http", ":path", "/s/M", ":authority", "x", "content-type", "application/grpc"}},
		{name: "content-type", fields: []string{":method", "POST", ":scheme", "http", ":path", "/s/M", ":authority", "x", "content-type", "text/html"}},
		{name: "no path", fields: []string{":method", "POST", ":scheme", "http", ":authority", "x", "content-type", "application/grpc"}},
		{name: "header too large", limit: proxy.LimitMaxHeaderSize, fields: []string{":method", "POST", ":scheme", "http", ":path", "/s/M", ":authority", "x", "content-type", "application/grpc", "x-big1", big, "x-big2", big, "x-big3", big, "x-big4", big}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ends := make(callEnds, 4)
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
				c.CountCallEnd = func(ci proxy.CallInfo) { ends <- ci }
				c.MaxHeaderListSize = 2048
			}})
			ctx := testkit.Context(t, 10*time.Second)
			r := dialRaw(t, e.addr)
			var hb bytes.Buffer
			enc := hpack.NewEncoder(&hb)
			for i := 0; i < len(tc.fields); i += 2 {
				enc.WriteField(hpack.HeaderField{Name: tc.fields[i], Value: tc.fields[i+1]})
			}
			if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: true}); err != nil {
				t.Fatal(err)
			}
			var sent []string
			r.next(func(f http2.Frame) bool {
				switch f := f.(type) {
				case *http2.MetaHeadersFrame:
					for _, hf := range f.Fields {
						if hf.Name == ":status" || hf.Name == "grpc-status" {
							sent = append(sent, hf.Name+"="+hf.Value)
						}
					}
					return f.StreamEnded()
				case *http2.RSTStreamFrame:
					sent = append(sent, "rst="+f.ErrCode.String())
					return true
				}
				return false
			})
			ci := ends.next(t, ctx)
			t.Logf("sent %v; reported %v %q limit %q method %q", sent, ci.Code, ci.Message, ci.Limit, ci.Method)
			want := ""
			for _, s := range sent {
				if v, ok := strings.CutPrefix(s, "grpc-status="); ok {
					want = v
				}
				if s == "rst=PROTOCOL_ERROR" {
					want = strconv.Itoa(int(codes.Internal))
				}
			}
			if want == "" || want != strconv.Itoa(int(ci.Code)) || ci.Limit != tc.limit || !ci.ProxyStatus {
				t.Errorf("sent %v; reported code %d limit %q proxy %v", sent, ci.Code, ci.Limit, ci.ProxyStatus)
			}
			select {
			case ci := <-ends:
				t.Errorf("second report %+v", ci)
			case <-time.After(50 * time.Millisecond):
			}
		})
	}
}
