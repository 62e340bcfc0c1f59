package director

import (
	"context"
	"testing"
)

// TestS25DepartedInFlight: an address that leaves the set with calls in
// flight and comes back while they run counts them in flight again; once
// they end its count is 0; an address that leaves and never comes back is
// not held once its calls ended (the next update drops it), and one that
// comes back after its calls ended starts at 0.
func TestS25DepartedInFlight(t *testing.T) {
	d := newTestDirector(t)
	inflight := func(addr string) int64 {
		for _, b := range d.Backends() {
			if b.Addr == addr {
				return b.InFlight
			}
		}
		t.Fatalf("%s not in the set", addr)
		return 0
	}
	update := func(addrs ...string) {
		t.Helper()
		if err := d.UpdateState(state(addrs...)); err != nil {
			t.Fatal(err)
		}
	}
	update("a:1")
	var dones []func(error)
	for range 3 {
		_, done, err := d.Pick(context.Background(), "/s/m")
		if err != nil {
			t.Fatal(err)
		}
		dones = append(dones, done)
	}
	update("b:1")
	update("a:1", "b:1")
	if got := inflight("a:1"); got != 3 {
		t.Errorf("a:1 back with 3 calls from before running: in flight %d, want 3", got)
	}
	dones[0](nil)
	if got := inflight("a:1"); got != 2 {
		t.Errorf("after one of them ended: in flight %d, want 2", got)
	}
	// a:1 leaves again and does not come back.
	update("b:1")
	if len(d.departed) != 1 {
		t.Errorf("departed holds %d addresses while a:1's calls run, want 1", len(d.departed))
	}
	dones[1](nil)
	dones[2](nil)
	update("b:1", "c:1")
	if len(d.departed) != 0 {
		t.Errorf("departed holds %v after a:1's calls ended and an update, want none", d.departed)
	}
	update("a:1", "b:1", "c:1")
	if got := inflight("a:1"); got != 0 {
		t.Errorf("a:1 back after its calls ended: in flight %d, want 0", got)
	}
}
