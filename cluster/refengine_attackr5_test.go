package cluster_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestGRPCProxyEngineLimits: the grpc-proxy engine honours the client-side
// limits the frame engine has, with the same defaults: connections over
// --max-connections are closed as soon as accepted, and
// --max-concurrent-streams and --max-header-list-size are advertised in
// its SETTINGS. It used to ignore all three: 40 connections were all
// served with --max-connections 5, and its SETTINGS carried neither limit
// (grpc-go's server then allows any number of streams per connection, each
// with its pump goroutines, and 16 MiB header lists).
func TestGRPCProxyEngineLimits(t *testing.T) {
	backend := startBackend(t, "b", "127.0.0.1:0")
	for _, tc := range []struct {
		name                string
		cfg                 proxy.Config
		maxConns            int
		wantStreams, wantHL uint32
	}{
		{name: "defaults", maxConns: proxy.DefaultMaxConnections, wantStreams: proxy.DefaultMaxConcurrentStreams, wantHL: proxy.DefaultMaxHeaderListSize},
		{name: "set", cfg: proxy.Config{MaxConnections: 2, MaxConcurrentStreams: 7, MaxHeaderListSize: 2000}, maxConns: 2, wantStreams: 7, wantHL: 2000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := runServer(t, cluster.ServerConfig{
				Logger: quiet, Engine: cluster.EngineGRPCProxy, Proxy: tc.cfg,
				Cluster: cluster.Config{Targets: []string{backend.Addr()}},
			}).addr
			wctx := testkit.Context(t, 8*time.Second)
			first, settings := rawH2(t, addr)
			if settings == nil {
				t.Fatal("the first connection got no SETTINGS")
			}
			for _, s := range []struct {
				id   http2.SettingID
				want uint32
			}{{http2.SettingMaxConcurrentStreams, tc.wantStreams}, {http2.SettingMaxHeaderListSize, tc.wantHL}} {
				if got, ok := settings.Value(s.id); !ok || got != s.want {
					t.Errorf("SETTINGS %v = %d (sent: %v), want %d", s.id, got, ok, s.want)
				}
			}
			client := dial(t, addr)
			if _, err := client.EmptyCall(wctx, &testgrpc.Empty{}); err != nil {
				t.Fatalf("a call: %v", err)
			}
			if tc.maxConns > 2 {
				return
			}
			// The cap is reached: the next connection is closed at once.
			if _, s := rawH2(t, addr); s != nil {
				t.Fatalf("a connection over --max-connections %d was served", tc.maxConns)
			}
			// One closes, and its place is taken again.
			first.Close()
			testkit.WaitFor(wctx, t, "a connection to be served after one closed", func() bool {
				nc, s := rawH2(t, addr)
				nc.Close()
				return s != nil
			})
		})
	}
}

// rawH2 opens an HTTP/2 connection to addr and returns it with the
// server's SETTINGS, or nil when the server closed it instead.
func rawH2(t *testing.T, addr string) (net.Conn, *http2.SettingsFrame) {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(nc, http2.ClientPreface)
	fr := http2.NewFramer(nc, nc)
	fr.WriteSettings()
	f, err := fr.ReadFrame()
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("no answer from the proxy: %v", err)
		}
		return nc, nil
	}
	sf, _ := f.(*http2.SettingsFrame)
	return nc, sf
}

// TestGRPCProxyEngineMessageSize: the grpc-proxy engine holds each message
// whole (decoded and re-encoded), so a message over --max-message-size
// fails RESOURCE_EXHAUSTED, a request and a response alike, and smaller
// ones pass. It had no bound: three 100 MiB requests through it took the
// proxy to 1 GiB of RSS (the frame engine: 37 MiB), and a client could
// send up to 2 GiB per message.
func TestGRPCProxyEngineMessageSize(t *testing.T) {
	backend := startBackend(t, "b", "127.0.0.1:0")
	const limit = 1 << 20
	addr := runServer(t, cluster.ServerConfig{
		Logger: quiet, Engine: cluster.EngineGRPCProxy, MaxMessageSize: limit,
		Cluster: cluster.Config{Targets: []string{backend.Addr()}},
	}).addr
	client := dial(t, addr)
	wctx := testkit.Context(t, 8*time.Second)
	for _, tc := range []struct {
		name          string
		req, resp     int
		wantExhausted bool
	}{
		{name: "under", req: limit / 2, resp: limit / 2},
		{name: "request over", req: 2 * limit, resp: 10, wantExhausted: true},
		{name: "response over", req: 10, resp: 2 * limit, wantExhausted: true},
	} {
		_, err := client.UnaryCall(wctx, &testgrpc.SimpleRequest{ResponseSize: int32(tc.resp), Payload: &testgrpc.Payload{Body: make([]byte, tc.req)}})
		if got := status.Code(err); (got == codes.ResourceExhausted) != tc.wantExhausted || (!tc.wantExhausted && err != nil) {
			t.Errorf("%s: %v, want RESOURCE_EXHAUSTED: %v", tc.name, err, tc.wantExhausted)
		}
	}
}

// TestGRPCProxyEngineSilentAndIdleConns: the grpc-proxy engine closes a
// connection that sends no preface within the preface timeout and shuts
// down (GOAWAY) one without a stream for the idle timeout, as the frame
// engine does, so neither holds a place under --max-connections. grpc-go's
// server waited 120 s for a preface and never timed out idle connections:
// with --max-connections N, N idle clients locked every other client out.
func TestGRPCProxyEngineSilentAndIdleConns(t *testing.T) {
	backend := startBackend(t, "b", "127.0.0.1:0")
	addr := runServer(t, cluster.ServerConfig{
		Logger: quiet, Engine: cluster.EngineGRPCProxy,
		Proxy:   proxy.Config{MaxConnections: 2, PrefaceTimeout: 300 * time.Millisecond, IdleTimeout: 300 * time.Millisecond},
		Cluster: cluster.Config{Targets: []string{backend.Addr()}},
	}).addr
	// A connection that never sends its preface is closed.
	silent, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { silent.Close() })
	silent.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, silent); err != nil {
		t.Errorf("a connection without a preface: %v, want it closed", err)
	}
	// An idle one gets GOAWAY.
	idle, settings := rawH2(t, addr)
	if settings == nil {
		t.Fatal("no SETTINGS")
	}
	fr := http2.NewFramer(idle, idle)
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("an idle connection: %v before GOAWAY", err)
		}
		if _, ok := f.(*http2.GoAwayFrame); ok {
			break
		}
	}
}

// TestGRPCProxyEngineResponseHeaderLimit: the grpc-proxy engine advertises
// --max-response-header-list-size to its backends, as the frame engine
// does, so a backend's headers over it fail the call instead of being
// taken and relayed: grpc-go's client took 16 MiB of them.
func TestGRPCProxyEngineResponseHeaderLimit(t *testing.T) {
	const limit = 64 << 10
	ts, err := testserver.New(testserver.Config{Name: "b", Logger: quiet,
		UnaryCallF: func(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
			grpc.SetHeader(ctx, metadata.Pairs("x-big", strings.Repeat("a", int(in.GetResponseSize()))))
			return &testgrpc.SimpleResponse{}, nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Stop)
	addr := runServer(t, cluster.ServerConfig{
		Logger: quiet, Engine: cluster.EngineGRPCProxy,
		Proxy:   proxy.Config{MaxResponseHeaderListSize: limit},
		Cluster: cluster.Config{Targets: []string{ts.Addr()}},
	}).addr
	client := dial(t, addr)
	wctx := testkit.Context(t, 8*time.Second)
	if _, err := client.UnaryCall(wctx, &testgrpc.SimpleRequest{ResponseSize: limit / 4}); err != nil {
		t.Errorf("headers under the limit: %v", err)
	}
	if _, err := client.UnaryCall(wctx, &testgrpc.SimpleRequest{ResponseSize: 2 * limit}); status.Code(err) != codes.Internal {
		t.Errorf("headers of %d bytes, over the limit of %d: %v, want INTERNAL", 2*limit, limit, err)
	}
}
