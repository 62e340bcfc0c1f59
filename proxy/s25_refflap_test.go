package proxy_test

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestS25ReferenceBackendBackInSetNotCut is TestH2llBackendBackInSetNotCut
// on the grpc-proxy engine: a long bidi stream runs on a backend that
// leaves the set and is back in the next set, well within the drain
// timeout. It must run on to its end, not be cut when the drain timeout
// of a backend that is in the set passes; a stream started after the
// backend came back runs too (on a new connection). The old connection
// is not kept for ever: it closes once its stream ended. A backend that
// leaves and does not come back still has its calls cut at the drain
// timeout (TestReferenceLeftSetIsUnavailable).
func TestS25ReferenceBackendBackInSetNotCut(t *testing.T) {
	verifyNoLeaks(t)
	const drainTimeout = 300 * time.Millisecond
	bl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conns := &connCountListener{Listener: bl}
	ts, err := testserver.New(testserver.Config{Name: "b0", Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); ts.Serve(conns) }()
	t.Cleanup(func() { ts.Stop(); <-served })
	b0 := bl.Addr().String()
	ref, err := proxy.NewReference(proxy.ReferenceConfig{Picker: pickerTo(b0), Logger: quietLog, DrainTimeout: drainTimeout})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveOn(t, ref, ln)
	client := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String()))
	ctx := testkit.Context(t, 20*time.Second)

	type call struct {
		ping func() error
		end  func() error
	}
	open := func() call {
		st, err := client.FullDuplexCall(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return call{
			ping: func() error {
				if err := st.Send(&testgrpc.StreamingOutputCallRequest{
					ResponseParameters: []*testgrpc.ResponseParameters{{Size: 100}},
				}); err != nil {
					_, err = st.Recv() // the call's status
					return err
				}
				_, err := st.Recv()
				return err
			},
			end: func() error {
				st.CloseSend()
				if _, err := st.Recv(); !errors.Is(err, io.EOF) {
					return err
				}
				return nil
			},
		}
	}
	old := open()
	if err := old.ping(); err != nil {
		t.Fatal(err)
	}
	// The backend leaves the set, and is back 50ms later.
	ref.RetainBackends(nil)
	time.Sleep(50 * time.Millisecond)
	ref.RetainBackends([]string{b0})
	fresh := open()
	// Both streams go on for three drain timeouts.
	start := time.Now()
	for time.Since(start) < 3*drainTimeout {
		if err := old.ping(); err != nil {
			t.Fatalf("the stream from before the flap, %v after the backend came back: %v", time.Since(start).Round(time.Millisecond), err)
		}
		if err := fresh.ping(); err != nil {
			t.Fatalf("the stream from after the flap, %v after the backend came back: %v", time.Since(start).Round(time.Millisecond), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := conns.open.Load(); n != 2 {
		t.Errorf("the backend has %d connections from the proxy, want 2 (the old one with its stream, the new one)", n)
	}
	if err := old.end(); err != nil {
		t.Errorf("the stream from before the flap: %v, want its end", err)
	}
	testkit.WaitFor(ctx, t, "the old connection to close after its last stream", func() bool { return conns.open.Load() == 1 })
	if err := fresh.ping(); err != nil {
		t.Errorf("the stream from after the flap: %v", err)
	}
	if err := fresh.end(); err != nil {
		t.Errorf("the stream from after the flap: %v, want its end", err)
	}
}

// connCountListener counts the connections it accepted that are not
// closed yet.
type connCountListener struct {
	net.Listener
	open atomic.Int64
}

func (l *connCountListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.open.Add(1)
	return &countedConn{Conn: c, open: &l.open}, nil
}

// countedConn takes itself off its listener's count when closed.
type countedConn struct {
	net.Conn
	open *atomic.Int64
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.open.Add(-1) })
	return c.Conn.Close()
}
