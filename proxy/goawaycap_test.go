package proxy_test

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestGoAwayMovesWaitersAtCap: calls waiting for a stream slot at
// MaxBackendConns (1 connection, SETTINGS_MAX_CONCURRENT_STREAMS 1, one
// call hanging on it) when that connection gets GOAWAY with last stream
// id 0. None of the calls was processed, the connection is left with no
// stream, and the backend's next connection answers every call. The
// connection leaves the pool before they are placed again: still counted
// against MaxBackendConns, and taking no waiting call, it made every
// waiting call fail UNAVAILABLE "every connection is at its stream limit"
// at once, and the unprocessed one "going away (GOAWAY) and did not
// process the call" (found by a helper). A direct grpc-go client
// (transparent retry on a new connection) loses none.
func TestGoAwayMovesWaitersAtCap(t *testing.T) {
	const waiters = 5
	var conns atomic.Int32
	goAway := make(chan struct{})
	be := testkit.ServeTCP(t, func(nc net.Conn) {
		n := conns.Add(1)
		s, err := acceptH2(nc)
		if err != nil {
			return
		}
		if n == 1 {
			if s.hello(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 1}) != nil {
				return
			}
			var once sync.Once
			s.serve(func(f http2.Frame) bool {
				if _, ok := f.(*http2.HeadersFrame); ok {
					once.Do(func() {
						go func() {
							<-goAway
							s.fr.WriteGoAway(0, http2.ErrCodeNo, nil)
						}()
					})
				}
				return true
			})
			return
		}
		if s.hello(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 100}) != nil {
			return
		}
		s.serve(func(f http2.Frame) bool {
			if h, ok := f.(*http2.HeadersFrame); ok && h.StreamEnded() {
				answerEmpty(s.fr, h.StreamID)
			}
			if d, ok := f.(*http2.DataFrame); ok && d.StreamEnded() {
				answerEmpty(s.fr, d.StreamID)
			}
			return true
		})
	})
	var infos callInfos
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(be), Logger: quietLog, OnCallEnd: infos.add, MaxBackendConns: 1})
	if err != nil {
		t.Fatal(err)
	}
	addr := serveProxy(t, srv).Addr().String()
	ctx := testkit.Context(t, 8*time.Second)
	cl := rawClient(t)
	type result struct{ code, msg string }
	res := make(chan result, waiters+1)
	call := func() {
		resp, err := cl.Do(grpcRequest(ctx, t, addr, "/grpc.testing.TestService/EmptyCall", map[string]string{"grpc-timeout": "3S"}))
		if err != nil {
			res <- result{"transport", err.Error()}
			return
		}
		c, m := grpcStatusOf(t, resp)
		res <- result{c, m}
	}
	go call() // takes the one slot and hangs
	testkit.WaitFor(ctx, t, "the first call on the backend", func() bool { return srv.ClientStreams() == 1 && srv.Waiting() == 0 && conns.Load() == 1 })
	time.Sleep(20 * time.Millisecond)
	for range waiters {
		go call()
	}
	testkit.WaitFor(ctx, t, "the calls waiting for a slot", func() bool { return srv.Waiting() == waiters })
	close(goAway)
	failed := map[string]int{}
	for range waiters + 1 {
		r := <-res
		if r.code != "0" {
			failed[r.code+" "+r.msg]++
		}
	}
	if len(failed) > 0 {
		t.Errorf("calls the backend never processed failed (want all %d to succeed on its next connection): %v; CallInfo.Attempts counts %v; backend connections %d",
			waiters+1, failed, infos.attempts(), conns.Load())
	}
}
