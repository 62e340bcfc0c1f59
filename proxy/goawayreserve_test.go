package proxy_test

import (
	"net"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestGoAwayAfterReserveNotCounted: a call whose stream slot was
// reserved on a new backend connection whose GOAWAY (last stream id 0,
// NO_ERROR: a graceful cycle) the proxy reads before the attempt joins the
// connection (addAttempt's errPeerGoAway) was never sent there either, as
// the calls moveUnsent places again, and is picked again the same way:
// not counted as an attempt, within the same bound of 16. Counted, three
// such connections in a row failed the call UNAVAILABLE "going away
// (GOAWAY) and did not process the call" with the default MaxRetries 2
// (found by a helper); the fourth connection answers it.
func TestGoAwayAfterReserveNotCounted(t *testing.T) {
	const cycles = 3
	type conn struct {
		ready, trigger, acked chan struct{}
	}
	conns := make(chan *conn, 16)
	var accepted atomic.Int32
	be := testkit.ServeTCP(t, func(nc net.Conn) {
		n := accepted.Add(1)
		s, err := acceptH2(nc)
		if err != nil || s.hello(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 100}) != nil {
			return
		}
		c := &conn{ready: make(chan struct{}), trigger: make(chan struct{}), acked: make(chan struct{})}
		if n <= cycles {
			conns <- c
			go func() {
				<-c.ready // serve wrote its SETTINGS ack and writes no more
				<-c.trigger
				s.fr.WriteGoAway(0, http2.ErrCodeNo, nil)
				s.fr.WritePing(false, [8]byte{'h', '3'})
			}()
		}
		readied := false
		s.serve(func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() && !readied {
					readied = true
					close(c.ready)
				}
			case *http2.PingFrame:
				if f.IsAck() && f.Data == [8]byte{'h', '3'} {
					close(c.acked)
				}
			case *http2.HeadersFrame:
				if n > cycles && f.StreamEnded() {
					answerEmpty(s.fr, f.StreamID)
				}
			case *http2.DataFrame:
				if n > cycles && f.StreamEnded() {
					answerEmpty(s.fr, f.StreamID)
				}
			}
			return true
		})
	})
	var infos callInfos
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(be), Logger: quietLog, OnCallEnd: infos.add})
	if err != nil {
		t.Fatal(err)
	}
	var reserves atomic.Int32
	proxy.SetAfterReserve(srv, func(string) {
		if reserves.Add(1) > cycles {
			return
		}
		// The slot is reserved on a new connection: its backend sends
		// GOAWAY, and the proxy has read it once it acknowledges the PING
		// that follows, all before the attempt joins the connection.
		select {
		case c := <-conns:
			close(c.trigger)
			select {
			case <-c.acked:
			case <-time.After(5 * time.Second):
				t.Error("the proxy did not acknowledge the PING after the GOAWAY")
			}
		case <-time.After(5 * time.Second):
			t.Error("no backend connection accepted")
		}
	})
	addr := serveProxy(t, srv).Addr().String()
	ctx := testkit.Context(t, 8*time.Second)
	resp, err := rawClient(t).Do(grpcRequest(ctx, t, addr, "/grpc.testing.TestService/EmptyCall", nil))
	if err != nil {
		t.Fatal(err)
	}
	code, msg := grpcStatusOf(t, resp)
	if code != "0" {
		t.Errorf("the call ended %s %q after %d GOAWAYs that came before it was sent (CallInfo.Attempts %v, %d backend connections): want OK from the backend's next connection",
			code, msg, cycles, infos.attempts(), accepted.Load())
	}
}
