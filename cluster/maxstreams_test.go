package cluster_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
)

// zeroStreamsServer is an HTTP/2 server that advertises
// SETTINGS_MAX_CONCURRENT_STREAMS=0 and answers SETTINGS and PING, and
// nothing else. It returns its address.
func zeroStreamsServer(t *testing.T) string {
	t.Helper()
	return testkit.ServeTCP(t, func(c net.Conn) {
		defer c.Close()
		preface := make([]byte, len(http2.ClientPreface))
		if _, err := io.ReadFull(c, preface); err != nil || string(preface) != http2.ClientPreface {
			return
		}
		fr := http2.NewFramer(c, c)
		if fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 0}) != nil {
			return
		}
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame, *http2.PingFrame:
				testkit.AckControl(fr, f)
			case *http2.HeadersFrame:
				// Over the advertised limit (RFC 9113 §5.1.2).
				fr.WriteRSTStream(f.StreamID, http2.ErrCodeRefusedStream)
			}
		}
	})
}

// TestConfigClusterAvoidsZeroStreamBackend: a configured cluster's calls,
// first attempts included, are not picked for a backend that advertises
// SETTINGS_MAX_CONCURRENT_STREAMS=0 once the proxy knows it, also on a
// route with a rate limit (which first attempts pass through).
func TestConfigClusterAvoidsZeroStreamBackend(t *testing.T) {
	zero := zeroStreamsServer(t)
	a := startBackend(t, "a", "127.0.0.1:0")
	b := startBackend(t, "b", "127.0.0.1:0")
	path := writeConfig(t, t.TempDir(), fmt.Sprintf(`
clusters:
  - {name: c, targets: [%s, %s, %s]}
routes:
  - {match: {service: grpc.testing.TestService}, cluster: c, rate_limit: {rate: 1000, burst: 1000}}
`, zero, a.Addr(), b.Addr()))
	r := runFile(t, path, true)
	cc := dial(t, r.addr)
	ctx := testkit.Context(t, 60*time.Second)
	call := func() {
		t.Helper()
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if _, err := cc.EmptyCall(cctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("call: %v", err)
		}
	}
	started := func() float64 {
		return scrape(t, r.admin, "streamlb_calls_started_total")["backend="+zero]
	}
	// The zero-streams backend is picked until the proxy has its SETTINGS;
	// then batches of calls leave it alone.
	testkit.WaitFor(ctx, t, "a batch of calls that does not pick the zero-streams backend", func() bool {
		before := started()
		for range 10 {
			call()
		}
		return started() == before
	})
	before := started()
	const calls = 60
	for range calls {
		call()
	}
	if n := started() - before; n != 0 {
		t.Errorf("the zero-streams backend was picked %v times in %d calls, want 0", n, calls)
	}
}
