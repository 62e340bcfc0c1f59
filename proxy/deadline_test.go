package proxy_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestDeadlineTimersReused: the proxy reuses a stream's grpc-timeout timer
// once the call ended before it fired (deadline.go). Calls that end in
// time put their timers back; calls after them with a long grpc-timeout
// must not be cut by a reused timer's earlier duration, and calls that
// hang must still end with the proxy's DEADLINE_EXCEEDED. The client does
// not enforce grpc-timeout itself, so only the proxy can end a call.
func TestDeadlineTimersReused(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2})
	ctx := testkit.Context(t, 30*time.Second)
	client := rawClient(t)
	run := func(phase string, n int, hdr map[string]string, wantCode, wantMsg string) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := client.Do(grpcRequest(ctx, t, e.addr, "/grpc.testing.TestService/EmptyCall", hdr))
				if err != nil {
					errs <- fmt.Errorf("%s call %d: %v", phase, i, err)
					return
				}
				code, msg := grpcStatusOf(t, resp)
				if code != wantCode || !strings.Contains(msg, wantMsg) {
					errs <- fmt.Errorf("%s call %d: grpc-status %q message %q, want %q with %q", phase, i, code, msg, wantCode, wantMsg)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	}
	for round := range 3 {
		// Quick calls: their 300 ms timers are stopped and pooled.
		run(fmt.Sprintf("round %d quick", round), 40, map[string]string{"grpc-timeout": "300m"}, "0", "")
		// 700 ms calls with 20 s to live, on the pooled timers.
		run(fmt.Sprintf("round %d slow", round), 40, map[string]string{"grpc-timeout": "20S", testserver.MetadataDelay: "700ms"}, "0", "")
		// Calls that hang: the timers (reused or new) must fire.
		run(fmt.Sprintf("round %d hanging", round), 40, map[string]string{"grpc-timeout": "200m", testserver.MetadataHang: "1"}, "4", "deadline")
	}
}
