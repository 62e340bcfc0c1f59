package cluster

import (
	"bytes"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"

	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
)

func TestOpenAccessLog(t *testing.T) {
	t.Parallel()
	ci := proxy.CallInfo{
		Method: "/s/M", Backend: "10.0.0.1:80", Attempts: 2, Code: codes.ResourceExhausted,
		Message: "streamlb: too many calls", ProxyStatus: true, Limit: proxy.LimitMaxStreams,
		Duration: 1500 * time.Microsecond, RequestBytes: 7, ResponseBytes: 9,
		Client: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5000},
	}
	for _, tc := range []struct {
		name, path, format string
		want               string // substring of the line; "" means an error
	}{
		{name: "text to stderr", path: "-", format: "text", want: `msg=call method=/s/M cluster=c backend=10.0.0.1:80 code=ResourceExhausted duration=1.5ms bytes_in=7 bytes_out=9 retries=1 client=127.0.0.1:5000 message="streamlb: too many calls" proxy_status=true limit=max_streams`},
		{name: "json to stderr", path: "stderr", format: "json", want: `"msg":"call","method":"/s/M","cluster":"c","backend":"10.0.0.1:80","code":"ResourceExhausted","duration":1500000,"bytes_in":7,"bytes_out":9,"retries":1,"client":"127.0.0.1:5000"`},
		{name: "unknown format", path: "-", format: "xml"},
		{name: "unwritable file", path: filepath.Join(t.TempDir(), "no", "such", "dir"), format: "text"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			al, err := OpenAccessLog(tc.path, tc.format, &buf)
			if tc.want == "" {
				if err == nil {
					al.Close()
					t.Fatal("got no error")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			al.callEnd("c", ci, nil)
			if err := al.Close(); err != nil {
				t.Fatal(err)
			}
			if got := buf.String(); !strings.Contains(got, tc.want) || strings.Count(got, "\n") != 1 {
				t.Errorf("got line %q, want one containing %q", got, tc.want)
			}
		})
	}
}

func TestCallEndMetrics(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	c, err := New(Config{Targets: []string{"10.0.0.1:80"}, Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	m := c.metrics
	// The resolver's set makes the backend current, as Run would.
	if err := m.UpdateState(resolver.State{Addresses: []resolver.Address{{Addr: "10.0.0.1:80"}}}); err != nil {
		t.Fatal(err)
	}
	m.callEnd(proxy.CallInfo{Code: codes.ResourceExhausted, ProxyStatus: true, Limit: proxy.LimitMaxStreamsPerBackend})
	m.callEnd(proxy.CallInfo{Backend: "10.0.0.1:80", Attempts: 3, Code: codes.Unavailable, RequestBytes: 10, ResponseBytes: 20})
	got := gathered(t, reg)
	for key, want := range map[string]float64{
		"streamlb_limit_rejections_total,limit=max_streams_per_backend": 1,
		"streamlb_limit_rejections_total,limit=max_streams":             0,
		"streamlb_retries_total,outcome=failed":                         2,
		"streamlb_retries_total,outcome=ok":                             0,
		"streamlb_request_bytes_total,backend=10.0.0.1:80":              10,
		"streamlb_response_bytes_total,backend=10.0.0.1:80":             20,
	} {
		if v, ok := got[key]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", key, v, ok, want)
		}
	}
}
