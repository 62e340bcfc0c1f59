package proxy_test

import (
	"bytes"
	"context"
	"runtime"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// stacksWith counts the goroutines whose stack holds every one of frames.
func stacksWith(frames ...string) int {
	buf := make([]byte, 1<<20)
	for {
		k := runtime.Stack(buf, true)
		if k < len(buf) {
			buf = buf[:k]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	n := 0
next:
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		for _, f := range frames {
			if !bytes.Contains(g, []byte(f)) {
				continue next
			}
		}
		n++
	}
	return n
}

// TestInlineWriteNeverBlocksReader: a backend connection's reader writes
// the responses it relays to client connections itself when their writers
// are idle (write combining), but never waits on a client's socket. One
// client asks for large answers on the one backend connection and stops
// reading; the frames for it fill its socket, and the rest waits for a
// writer goroutine. Meanwhile another client's calls over the same backend
// connection all complete: had the reader blocked on the full socket, they
// would wait for WriteTimeout (longer than the test). Bounded by counts:
// a fixed number of calls, each with its own deadline.
func TestInlineWriteNeverBlocksReader(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
		c.WriteTimeout = 5 * time.Minute
		// Backend windows large enough that the proxy takes more for
		// the stuck client than its socket buffers hold (loopback
		// autotunes them to a few MiB).
		c.BackendStreamWindow = 8 << 20
		c.BackendMaxStreamWindow = 8 << 20
		c.MaxConnBufferedBytes = 256 << 20
	}})
	stuck := dialRaw(t, e.addr)
	handshakeRaw(t, stuck)
	stuck.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
	stuck.fr.WriteWindowUpdate(0, 1<<30)
	params := make([]*testgrpc.ResponseParameters, 16)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: 1 << 20}
	}
	const streams = 4
	for i := range streams {
		id := uint32(2*i + 1)
		stuck.headers(id, "/grpc.testing.TestService/StreamingOutputCall", false)
		stuck.fr.WriteData(id, true, grpcMsg(&testgrpc.StreamingOutputCallRequest{ResponseParameters: params}))
	}
	// From here on the stuck client reads nothing.
	ctx := testkit.Context(t, 60*time.Second)
	testkit.WaitFor(ctx, t, "a writer goroutine waiting on the stuck client's full socket", func() bool {
		return stacksWith("proxy.(*transport).runWriter", "proxy.(*connWriter).writeOut") > 0
	})
	const calls = 200
	for i := range calls {
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		_, err := e.client.UnaryCall(cctx, &testgrpc.SimpleRequest{ResponseSize: 100})
		cancel()
		if err != nil {
			t.Fatalf("call %d of %d beside the stuck client: %v", i, calls, err)
		}
		if n := stacksWith("proxy.(*transport).readLoop", "proxy.(*connWriter).writeOut"); n > 0 {
			t.Fatalf("after call %d: %d reader goroutines inside a socket write", i, n)
		}
	}
	// The stuck client is still stuck: its writer still waits, so the
	// calls above went by while its socket was full.
	if n := stacksWith("proxy.(*transport).runWriter", "proxy.(*connWriter).writeOut"); n == 0 {
		t.Fatal("the stuck client's writer no longer waits: the test did not test a full socket")
	}
	if got := e.backends[0].Canceled(); got != 0 {
		t.Errorf("%d backend streams cancelled while the stuck client's connection was open", got)
	}
}
