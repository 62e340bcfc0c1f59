package proxy_test

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestGRPCTimeoutAfterProxyWait: a call that waits in the proxy before
// its attempt is sent (a new backend connection whose handshake takes
// 300 ms; a first backend that never completes its handshake, then a
// retry) is sent what is left of the client's grpc-timeout, not the value
// the client sent: with that value the backend's deadline came 300 ms
// after the client's (found from outside by comparing with a direct
// grpc-go client, which computes grpc-timeout when it sends). A call sent
// at once keeps the client's value as it came. The same for a call that
// waited for a stream slot on a backend that takes one at a time.
func TestGRPCTimeoutAfterProxyWait(t *testing.T) {
	const wait = 300 * time.Millisecond
	call := func(t *testing.T, addr string, timeouts chan string) time.Duration {
		t.Helper()
		ctx := testkit.Context(t, 10*time.Second)
		resp, err := rawClient(t).Do(grpcRequest(ctx, t, addr, "/grpc.testing.TestService/EmptyCall", map[string]string{"grpc-timeout": "1S"}))
		if err != nil {
			t.Fatal(err)
		}
		if code, msg := grpcStatusOf(t, resp); code != "4" {
			t.Fatalf("grpc-status %s (%q), want 4: the backend never answers", code, msg)
		}
		select {
		case v := <-timeouts:
			return grpcTimeout(t, v)
		default:
			t.Fatal("the backend saw no request")
			return 0
		}
	}
	for _, tc := range []struct {
		name string
		cfg  func(*proxy.Config)
	}{
		{"handshake", func(*proxy.Config) {}},
		// With no retry left the handshake's wait has no timer (the call
		// has nowhere else to go); it waited all the same (found by a
		// helper: sent as it came).
		{"handshake-no-retries", func(c *proxy.Config) { c.MaxRetries = -1 }},
		{"handshake-no-retry-buffer", func(c *proxy.Config) { c.RetryBufferSize = -1 }},
	} {
		t.Run(tc.name, func(t *testing.T) { handshakeWait(t, tc.cfg, wait, call) })
	}
	t.Run("slot", func(t *testing.T) {
		// The backend takes one stream at a time; a call that waits for
		// the slot a hanging one holds until its 600 ms deadline is sent
		// what is left of its 1 s.
		timeouts := make(chan string, 8)
		one := testkit.ServeTCP(t, func(nc net.Conn) {
			s, err := acceptH2(nc)
			if err != nil || s.hello(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 1}) != nil {
				return
			}
			s.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
			s.serve(func(f http2.Frame) bool {
				if h, ok := f.(*http2.MetaHeadersFrame); ok {
					for _, hf := range h.Fields {
						if hf.Name == "grpc-timeout" {
							timeouts <- hf.Value
						}
					}
				}
				return true
			})
		})
		addr := newProxyListener(t, proxy.Config{Picker: pickerTo(one), Logger: quietLog, MaxBackendConns: 1}).Addr().String()
		ctx := testkit.Context(t, 10*time.Second)
		first := make(chan string, 1)
		go func() {
			resp, err := rawClient(t).Do(grpcRequest(ctx, t, addr, "/grpc.testing.TestService/EmptyCall", map[string]string{"grpc-timeout": "600m"}))
			if err != nil {
				first <- err.Error()
				return
			}
			code, _ := grpcStatusOf(t, resp)
			first <- code
		}()
		// The first call waited for the new connection's handshake (a
		// few ms): it may be sent what is left of its 600 ms.
		if d := grpcTimeout(t, <-timeouts); d > 600*time.Millisecond || d < 500*time.Millisecond {
			t.Fatalf("the first call was sent grpc-timeout %v, want its 600ms, or a little less", d)
		}
		if got := call(t, addr, timeouts); got > time.Second-400*time.Millisecond {
			t.Errorf("after waiting about 600 ms for a slot the backend was sent grpc-timeout %v, want at most %v", got, time.Second-400*time.Millisecond)
		}
		if code := <-first; code != "4" {
			t.Errorf("the first call ended %s, want 4 (its deadline)", code)
		}
	})
	t.Run("retry", func(t *testing.T) {
		timeouts := make(chan string, 8)
		silent := testkit.ServeTCP(t, func(c net.Conn) { <-t.Context().Done() })
		hanging := testkit.ServeTCP(t, hangingH2(timeouts, make(chan http2.ErrCode, 8)))
		var n atomic.Int32
		pick := proxy.PickerFunc(func(context.Context, string) (string, func(error), error) {
			if n.Add(1) == 1 {
				return silent, nil, nil
			}
			return hanging, nil, nil
		})
		addr := newProxyListener(t, proxy.Config{Picker: pick, Logger: quietLog, HandshakeTimeout: wait}).Addr().String()
		if got := call(t, addr, timeouts); got > time.Second-wait+50*time.Millisecond {
			t.Errorf("retried after a %v handshake timeout, the backend was sent grpc-timeout %v, want at most %v", wait, got, time.Second-wait+50*time.Millisecond)
		}
		if n.Load() < 2 {
			t.Errorf("%d picks, want a retry", n.Load())
		}
	})
}

// handshakeWait is TestGRPCTimeoutAfterProxyWait's handshake case, with
// the proxy's Config changed by cfg.
func handshakeWait(t *testing.T, cfg func(*proxy.Config), wait time.Duration, call func(*testing.T, string, chan string) time.Duration) {
	timeouts := make(chan string, 8)
	slow := testkit.ServeTCP(t, func(c net.Conn) {
		time.Sleep(wait)
		hangingH2(timeouts, make(chan http2.ErrCode, 8))(c)
	})
	pc := proxy.Config{Picker: pickerTo(slow), Logger: quietLog}
	cfg(&pc)
	addr := newProxyListener(t, pc).Addr().String()
	if got := call(t, addr, timeouts); got > time.Second-wait+50*time.Millisecond {
		t.Errorf("after a %v handshake the backend was sent grpc-timeout %v, want at most %v", wait, got, time.Second-wait+50*time.Millisecond)
	}
	// The connection is up now: sent at once, the value passes as it came.
	if got := call(t, addr, timeouts); got != time.Second {
		t.Errorf("sent at once, the backend got grpc-timeout %v, want the client's 1S", got)
	}
}
