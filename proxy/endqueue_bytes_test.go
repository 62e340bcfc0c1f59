package proxy_test

import (
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestCallEndQueueBoundedInBytes: the calls waiting for an OnCallEnd hook
// that fell behind (an access log on a slow disk) are bounded by the bytes
// their strings hold, not only by their count (65,536): a client that
// sends request paths of 30 KiB, which the backend's UNIMPLEMENTED
// message repeats, made each waiting call hold 60 KiB, and the queue up to
// 4 GiB. With either engine the calls over the bound are left out of the
// hook (counted and warned about), as those over the count are.
func TestCallEndQueueBoundedInBytes(t *testing.T) {
	const bound = 1 << 20
	proxy.SetMaxPendingEndBytes(t, bound)
	for _, engine := range []string{"frame", "grpc-proxy"} {
		t.Run(engine, func(t *testing.T) {
			release := make(chan struct{})
			var mu sync.Mutex
			var calls, held int
			hook := func(ci proxy.CallInfo) {
				<-release // the first call holds the hook until the calls are in
				mu.Lock()
				calls++
				held += len(ci.Method) + len(ci.Message)
				mu.Unlock()
			}
			e := newEnv(t, envOpts{backends: 1, engine: engine,
				pcfg: func(c *proxy.Config) { c.OnCallEnd = hook },
				rcfg: func(c *proxy.ReferenceConfig) { c.OnCallEnd = hook }})
			method := "/" + strings.Repeat("x", 30<<10) + "/M"
			ctx := testkit.Context(t, 30*time.Second)
			const sent = 100 // 6 MiB of strings, 6 times the bound
			for i := range sent {
				err := e.cc.Invoke(ctx, method, &emptypb.Empty{}, &emptypb.Empty{})
				if status.Code(err) != codes.Unimplemented {
					t.Fatalf("call %d: %v, want the backend's UNIMPLEMENTED", i, err)
				}
			}
			close(release)
			// Wait until the hook has taken every call it will get.
			last := -1
			testkit.WaitFor(ctx, t, "the hook to take the queued calls", func() bool {
				time.Sleep(200 * time.Millisecond)
				mu.Lock()
				defer mu.Unlock()
				done := calls == last
				last = calls
				return done
			})
			mu.Lock()
			defer mu.Unlock()
			per := held / calls
			// The call held in the hook, plus what the bound holds.
			if max := 1 + bound/per + 1; calls > max {
				t.Errorf("the hook got %d of %d calls of %d bytes each (%d bytes), want at most %d: the queue held more than %d bytes",
					calls, sent, per, held, max, bound)
			}
			if calls == 0 {
				t.Error("the hook got no call")
			}
		})
	}
}
