package resolver

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestH1ZKHostUnresolvableRetried: a zk:// target whose host does not
// resolve when Run starts (go-zookeeper resolves its hosts once, in
// Connect) is a failure like any other: Run keeps going, reports it and
// tries again after the backoff, rather than returning, which in a Group
// ends that target for good. The .onion name fails its lookup without a
// DNS query (RFC 7686).
func TestH1ZKHostUnresolvableRetried(t *testing.T) {
	z, err := NewZK(mustTarget(t, "zk://zk-not-there.onion:2181/services/echo"),
		ZKOptions{BackoffInitial: 20 * time.Millisecond, BackoffMax: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	u := newRecUpdater()
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- z.Run(ctx, u) }()
	deadline := time.After(3 * time.Second)
	for {
		if _, errs := u.snapshot(); len(errs) >= 3 {
			if !strings.Contains(errs[0].Error(), "zk-not-there.onion") {
				t.Errorf("reported error %q does not name the target", errs[0])
			}
			break
		}
		select {
		case err := <-ran:
			cancel()
			t.Fatalf("Run returned %v; want it to go on and try again", err)
		case <-u.notify:
		case <-deadline:
			cancel()
			_, errs := u.snapshot()
			t.Fatalf("%d failures reported in 3s, want 3 (backoff 20ms to 50ms)", len(errs))
		}
	}
	cancel()
	select {
	case err := <-ran:
		if err != nil {
			t.Errorf("Run after cancel = %v, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}
