package proxy_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// sentRecordingPicker is an UpstreamPicker over next (a RetryPicker) that
// records, for every pick, whether the proxy sent it (UpstreamPick.Sent)
// and what its done was handed.
type sentRecordingPicker struct {
	next interface {
		proxy.Picker
		proxy.RetryPicker
	}
	mu    sync.Mutex
	picks []*recordedPick
}

type recordedPick struct {
	addr       string
	sent, done bool
	err        error // done's
}

func (p *sentRecordingPicker) Pick(ctx context.Context, m string) (string, func(error), error) {
	return p.next.Pick(ctx, m)
}

func (p *sentRecordingPicker) PickUpstream(ctx context.Context, m string, _ *proxy.Upstream, avoid []string) (proxy.UpstreamPick, error) {
	var addr string
	var done func(error)
	var err error
	if len(avoid) > 0 {
		addr, done, err = p.next.PickExcluding(ctx, m, avoid)
	} else {
		addr, done, err = p.next.Pick(ctx, m)
	}
	if err != nil {
		return proxy.UpstreamPick{}, err
	}
	r := &recordedPick{addr: addr}
	p.mu.Lock()
	p.picks = append(p.picks, r)
	p.mu.Unlock()
	return proxy.UpstreamPick{Addr: addr,
		Sent: func() {
			p.mu.Lock()
			r.sent = true
			p.mu.Unlock()
		},
		Done: func(err error) {
			p.mu.Lock()
			r.done, r.err = true, err
			p.mu.Unlock()
			if done != nil {
				done(err)
			}
		}}, nil
}

// unsent returns the picks whose done was called but that were never
// sent, and how many picks were made.
func (p *sentRecordingPicker) unsent() (out []recordedPick, picks int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range p.picks {
		if r.done && !r.sent {
			out = append(out, *r)
		}
	}
	return out, len(p.picks)
}

// TestOverLimitPickDone: a call whose slot was reserved on a backend
// connection's assumed stream limit, and that the backend's SETTINGS
// (MAX_CONCURRENT_STREAMS 1) then leave without one, is placed again and
// served on a second connection. The pick it leaves was never sent: its
// done gets CANCELLED, which a director counts neither for nor against
// the backend, and no ConnectionFailure or Draining, and it is never
// Sent, so metrics count it neither started nor finished. Its message
// says what happened, as the other picks placed again without being
// sent do ("not used: it takes no streams", "not used: the call already
// tried it"): the backend's stream limit left no slot (before: "at its
// connection cap", which the pool was not at). Both ways in: the
// SETTINGS found the call pending (onPeerSettings, moveWaiter), or came
// between its reservation and its queueing (addAttempt's errOverLimit).
func TestOverLimitPickDone(t *testing.T) {
	for _, afterReserve := range []bool{false, true} {
		t.Run(map[bool]string{false: "at handshake", true: "after reserve"}[afterReserve], func(t *testing.T) {
			verifyNoLeaks(t)
			unsettled := proxy.UnsettledStreams()
			gate := make(chan struct{})
			b := &settingsBackend{gate: gate}
			addr := rawBackend(t, b.serve)
			heldOne := func() bool {
				b.mu.Lock()
				defer b.mu.Unlock()
				return len(b.held) == 1
			}
			var pk *sentRecordingPicker
			var reserved atomic.Int32
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) {
				pk = &sentRecordingPicker{next: c.Picker.(interface {
					proxy.Picker
					proxy.RetryPicker
				})}
				c.Picker = pk
				c.MaxBackendConns = 2
				c.BackendPendingTimeout = 20 * time.Second
				c.HandshakeTimeout = 20 * time.Second
			}, hook: func(s *proxy.Server) {
				if !afterReserve {
					return
				}
				proxy.SetAfterReserve(s, func(string) {
					if reserved.Add(1) != 2 {
						return
					}
					// The second call's slot is reserved on the assumed
					// limit; the SETTINGS come, and the first call takes
					// the one slot, before it is queued.
					close(gate)
					waitInHook(t, "the first call on the backend", heldOne)
				})
			}})
			e.setBackends(addr)
			srv := e.srv.(*proxy.Server)
			ctx := testkit.Context(t, 30*time.Second)
			hctx, cancelHang := context.WithCancel(metadata.AppendToOutgoingContext(ctx, "x-hang", "1"))
			defer cancelHang()
			first := make(chan error, 1)
			go func() {
				_, err := e.client.EmptyCall(hctx, &testgrpc.Empty{})
				first <- err
			}()
			testkit.WaitFor(ctx, t, "the first call waiting for the handshake", func() bool { return srv.PendingAttempts() == 1 })
			client := e.client
			if afterReserve {
				client = testgrpc.NewTestServiceClient(e.dial(e.addr))
			}
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			second := make(chan error, 1)
			go func() {
				_, err := client.EmptyCall(cctx, &testgrpc.Empty{})
				second <- err
			}()
			if !afterReserve {
				testkit.WaitFor(ctx, t, "both calls waiting for the handshake", func() bool { return srv.PendingAttempts() == 2 })
				close(gate)
			}
			if err := <-second; err != nil {
				t.Fatalf("the call over the backend's limit: %v, want it served on another connection", err)
			}
			moved, picks := pk.unsent()
			if len(moved) != 1 || picks != 3 {
				t.Fatalf("%d picks, %d ended unsent (%+v), want 3 picks (the held call, the moved call's first and its second) and 1 unsent", picks, len(moved), moved)
			}
			err := moved[0].err
			st := status.Convert(err)
			if st.Code() != codes.Canceled {
				t.Errorf("done of the pick over the limit: %v, want CANCELLED (not the backend's failure)", err)
			}
			var cf proxy.ConnectionFailure
			var dr proxy.Draining
			if errors.As(err, &cf) || errors.As(err, &dr) {
				t.Errorf("done of the pick over the limit: %v (%T) is a ConnectionFailure or Draining", err, err)
			}
			if msg := st.Message(); strings.Contains(msg, "connection cap") || !strings.Contains(msg, "SETTINGS_MAX_CONCURRENT_STREAMS") || !strings.Contains(msg, addr) {
				t.Errorf("done of the pick over the limit says %q, want it to name %s and its SETTINGS_MAX_CONCURRENT_STREAMS, not a connection cap", msg, addr)
			}
			cancelHang()
			if err := <-first; status.Code(err) != codes.Canceled {
				t.Errorf("the held call: %v, want CANCELLED", err)
			}
			testkit.WaitFor(ctx, t, "nothing pending", func() bool { return srv.Waiting() == 0 && srv.PendingAttempts() == 0 })
			checkSettled(t, unsettled)
		})
	}
}
