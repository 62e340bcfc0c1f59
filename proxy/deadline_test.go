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

// TestLongestGRPCTimeout: the largest grpc-timeout a client can send
// (8 digits of hours, which saturates a time.Duration) is a deadline that
// never passes, not one that has: the deadline the proxy notes (saturated
// to the far future) and the timer it starts for what is left of it must
// let the call end OK, with a backend delay so that the timer is running.
func TestLongestGRPCTimeout(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	ctx := testkit.Context(t, 30*time.Second)
	client := rawClient(t)
	for _, timeout := range []string{"99999999H", "2562047H", "99999999S"} {
		resp, err := client.Do(grpcRequest(ctx, t, e.addr, "/grpc.testing.TestService/EmptyCall",
			map[string]string{"grpc-timeout": timeout, testserver.MetadataDelay: "50ms"}))
		if err != nil {
			t.Fatalf("grpc-timeout %s: %v", timeout, err)
		}
		if code, msg := grpcStatusOf(t, resp); code != "0" {
			t.Errorf("grpc-timeout %s: grpc-status %q (%q), want 0", timeout, code, msg)
		}
	}
}

// TestDeadlineTimersRacing: calls whose grpc-timeout (3 ms) is about their
// backend's delay, so that a timer is stopped as it fires again and again,
// run beside calls with 20 s to live and a 50 ms delay, on timers from the
// same pool. A short call ends OK or DEADLINE_EXCEEDED; a long call must
// end OK: a timer that fired, or was firing, when its call ended must not
// be reused and cut a later call.
func TestDeadlineTimersRacing(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2})
	ctx := testkit.Context(t, 30*time.Second)
	client := rawClient(t)
	const workers, calls = 8, 48
	var wg sync.WaitGroup
	errs := make(chan error, workers*calls)
	var nExpired, nShortOK int64
	var mu sync.Mutex
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range calls {
				long := (w+i)%3 == 0
				hdr := map[string]string{"grpc-timeout": "3m", testserver.MetadataDelay: fmt.Sprintf("%dms", 1+i%5)}
				if long {
					hdr = map[string]string{"grpc-timeout": "20S", testserver.MetadataDelay: "50ms"}
				}
				resp, err := client.Do(grpcRequest(ctx, t, e.addr, "/grpc.testing.TestService/EmptyCall", hdr))
				if err != nil {
					errs <- fmt.Errorf("worker %d call %d: %v", w, i, err)
					return
				}
				code, msg := grpcStatusOf(t, resp)
				switch {
				case long && code != "0":
					errs <- fmt.Errorf("worker %d call %d (20 s to live): grpc-status %q %q, want 0", w, i, code, msg)
				case !long && code != "0" && code != "4":
					errs <- fmt.Errorf("worker %d call %d (3 ms to live): grpc-status %q %q, want 0 or 4", w, i, code, msg)
				case !long:
					mu.Lock()
					if code == "4" {
						nExpired++
					} else {
						nShortOK++
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("short calls: %d expired, %d ended in time", nExpired, nShortOK)
}
