package proxy_test

import (
	"context"
	"errors"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// routePicker is a proxy.UpstreamPicker whose every pick is addr with a
// route timeout of timeout, and which records the call argument of each
// pick on calls (buffered; a pick never waits on it).
type routePicker struct {
	addr    string
	timeout atomic.Int64 // a time.Duration
	calls   chan *proxy.Upstream
}

func (p *routePicker) Pick(context.Context, string) (string, func(error), error) {
	panic("both engines must call PickUpstream")
}

func (p *routePicker) PickUpstream(_ context.Context, _ string, call *proxy.Upstream, _ []string) (proxy.UpstreamPick, error) {
	select {
	case p.calls <- call:
	default:
	}
	return proxy.UpstreamPick{Addr: p.addr, Timeout: time.Duration(p.timeout.Load())}, nil
}

// hangingH2 is a raw HTTP/2 backend that never answers: it reports each
// request's grpc-timeout on timeouts ("" when the request has none) and
// the code of each RST_STREAM the proxy sends on resets. Both channels are
// buffered by the caller; the backend never blocks on them.
func hangingH2(timeouts chan<- string, resets chan<- http2.ErrCode) func(net.Conn) {
	return h2Frames(func(s *h2Server, f http2.Frame) bool {
		if s.fr.ReadMetaHeaders == nil {
			// Set at the first frame (the proxy's SETTINGS), before any
			// HEADERS: the Framer then decodes header blocks.
			s.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			v := ""
			for _, hf := range f.Fields {
				if hf.Name == "grpc-timeout" {
					v = hf.Value
				}
			}
			select {
			case timeouts <- v:
			default:
			}
		case *http2.RSTStreamFrame:
			select {
			case resets <- f.ErrCode:
			default:
			}
		}
		return true
	})
}

// grpcTimeout parses a grpc-timeout value, as the gRPC over HTTP/2 spec
// writes it.
func grpcTimeout(t *testing.T, v string) time.Duration {
	t.Helper()
	units := map[byte]time.Duration{'H': time.Hour, 'M': time.Minute, 'S': time.Second, 'm': time.Millisecond, 'u': time.Microsecond, 'n': time.Nanosecond}
	if len(v) < 2 || len(v) > 9 || units[v[len(v)-1]] == 0 {
		t.Fatalf("grpc-timeout %q is malformed", v)
	}
	n, err := strconv.ParseInt(v[:len(v)-1], 10, 64)
	if err != nil {
		t.Fatalf("grpc-timeout %q: %v", v, err)
	}
	return time.Duration(n) * units[v[len(v)-1]]
}

// serveEngine serves engine with picker on loopback until cleanup and
// returns a client of it.
func serveEngine(t *testing.T, engine string, picker proxy.Picker) testgrpc.TestServiceClient {
	t.Helper()
	var srv server
	var err error
	switch engine {
	case "frame":
		srv, err = proxy.New(proxy.Config{Picker: picker, Logger: quietLog})
	default:
		srv, err = proxy.NewReference(proxy.ReferenceConfig{Picker: picker, Logger: quietLog})
	}
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; !errors.Is(err, proxy.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return testgrpc.NewTestServiceClient((&env{t: t}).dial(ln.Addr().String()))
}

// TestRouteTimeout: a pick's UpstreamPick.Timeout bounds the call with
// either engine when it comes before the client's deadline: the client
// gets DEADLINE_EXCEEDED saying it was the route's timeout, no sooner
// than that timeout; the backend, which never answers, was sent a
// grpc-timeout no larger than it, and its stream is reset with CANCEL.
// A client deadline shorter than the route's still wins (and is what the
// backend is sent), and without either the backend is sent none.
func TestRouteTimeout(t *testing.T) {
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			timeouts := make(chan string, 1)
			resets := make(chan http2.ErrCode, 1)
			p := &routePicker{addr: rawBackend(t, hangingH2(timeouts, resets)), calls: make(chan *proxy.Upstream, 1)}
			client := serveEngine(t, engine, p)
			ctx := testkit.Context(t, 30*time.Second)

			for _, tc := range []struct {
				name   string
				route  time.Duration
				client time.Duration // 0: no deadline
				// bound is the most the backend's grpc-timeout may be,
				// and the earliest the call may end; 0: the backend must
				// be sent no grpc-timeout.
				bound     time.Duration
				routeWins bool
			}{
				{name: "route timeout, client without deadline", route: 200 * time.Millisecond, bound: 200 * time.Millisecond, routeWins: true},
				{name: "route timeout before client deadline", route: 200 * time.Millisecond, client: 20 * time.Second, bound: 200 * time.Millisecond, routeWins: true},
				{name: "client deadline before route timeout", route: 20 * time.Second, client: 200 * time.Millisecond, bound: 200 * time.Millisecond},
			} {
				t.Run(tc.name, func(t *testing.T) {
					p.timeout.Store(int64(tc.route))
					// Not ctx, which has a deadline.
					cctx, cancel := context.WithCancel(context.Background())
					if tc.client > 0 {
						cctx, cancel = context.WithTimeout(context.Background(), tc.client)
					}
					defer cancel()
					start := time.Now()
					_, err := client.EmptyCall(cctx, &testgrpc.Empty{})
					took := time.Since(start)
					if status.Code(err) != codes.DeadlineExceeded {
						t.Fatalf("EmptyCall = %v, want DEADLINE_EXCEEDED", err)
					}
					if got := strings.Contains(err.Error(), "route timeout"); got != tc.routeWins {
						t.Errorf("EmptyCall = %v: names the route timeout: %v, want %v", err, got, tc.routeWins)
					}
					// Loose: the timer starts at the pick, after the
					// client's start; the upper bound only says the
					// 20 s deadline did not decide.
					if took < tc.bound-10*time.Millisecond || took > 10*time.Second {
						t.Errorf("EmptyCall ended after %v, want about %v (at least %v)", took, tc.bound, tc.bound-10*time.Millisecond)
					}
					if call := <-p.calls; call != nil {
						t.Errorf("first pick's call argument = %v, want nil", call)
					}
					select {
					case v := <-timeouts:
						if got := grpcTimeout(t, v); got <= 0 || got > tc.bound {
							t.Errorf("backend was sent grpc-timeout %q (%v), want above 0 and at most %v", v, got, tc.bound)
						}
					case <-ctx.Done():
						t.Fatal("the backend saw no request")
					}
					select {
					case code := <-resets:
						if code != http2.ErrCodeCancel {
							t.Errorf("backend stream reset with %v, want CANCEL", code)
						}
					case <-ctx.Done():
						t.Fatal("the backend stream was never reset")
					}
				})
			}
			t.Run("no timeout", func(t *testing.T) {
				p.timeout.Store(0)
				// Not ctx, which has a deadline.
				cctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				ended := make(chan error, 1)
				go func() {
					_, err := client.EmptyCall(cctx, &testgrpc.Empty{})
					ended <- err
				}()
				select {
				case v := <-timeouts:
					if v != "" {
						t.Errorf("backend was sent grpc-timeout %q, want none (no route timeout, no client deadline)", v)
					}
				case <-ctx.Done():
					t.Fatal("the backend saw no request")
				}
				cancel()
				if err := <-ended; status.Code(err) != codes.Canceled {
					t.Errorf("EmptyCall cancelled by the client = %v, want CANCELED", err)
				}
				<-p.calls
				select {
				case <-resets:
				case <-ctx.Done():
					t.Fatal("the backend stream was never reset")
				}
			})
		})
	}
}
