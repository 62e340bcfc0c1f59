package director

import (
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestH1Inherit: a director built to replace another (a reload rebuilt
// the cluster) starts the backends both have with the old one's verdicts:
// unhealthy stays unhealthy while it checks health too, and an ejection
// runs to its end when ejections are inherited; a backend new to the set,
// or a set after the first, starts fresh; an unhealthy verdict is not
// inherited by a director that checks no health (nothing would clear it).
func TestH1Inherit(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name          string
		cfg           Config
		ejections     bool
		wantUnhealthy bool
		wantEjected   bool
	}{
		{"same checks", Config{HealthCheckInterval: time.Hour, EjectAfter: 2, BaseEjection: 30 * time.Second}, true, true, true},
		{"other dial settings", Config{HealthCheckInterval: time.Hour, EjectAfter: 2}, false, true, false},
		{"no health checks", Config{EjectAfter: 2}, true, false, true},
		{"no ejection", Config{HealthCheckInterval: time.Hour, EjectAfter: -1}, true, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newFakeClock()
			old := newOutlierDirector(t, Config{HealthCheckInterval: time.Hour, EjectAfter: 2, BaseEjection: 30 * time.Second}, clk, "a:1", "b:1", "c:1")
			setHealthOf(t, old, "b:1", false)
			failN(t, old, "c:1", status.Error(codes.Unavailable, "down"), 2)
			if !statsOf(t, old, "c:1").Ejected || statsOf(t, old, "b:1").Healthy {
				t.Fatalf("old: b healthy %v, c ejected %v; want b unhealthy, c ejected", statsOf(t, old, "b:1").Healthy, statsOf(t, old, "c:1").Ejected)
			}
			cfg := tc.cfg
			cfg.Logger, cfg.Now = discardLogger(), clk.Now
			d, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			d.Inherit(old, tc.ejections)
			mustUpdate(t, d, state("a:1", "b:1", "c:1", "d:1"))
			if got := !statsOf(t, d, "b:1").Healthy; got != tc.wantUnhealthy {
				t.Errorf("b unhealthy %v, want %v", got, tc.wantUnhealthy)
			}
			if got := statsOf(t, d, "c:1").Ejected; got != tc.wantEjected {
				t.Errorf("c ejected %v, want %v", got, tc.wantEjected)
			}
			if st := statsOf(t, d, "d:1"); !st.Healthy || st.Ejected || !statsOf(t, d, "a:1").Healthy {
				t.Errorf("a or the new d not healthy and unejected: %+v", d.Backends())
			}
			if tc.wantEjected {
				clk.Advance(31 * time.Second)
				if statsOf(t, d, "c:1").Ejected {
					t.Errorf("c still ejected after the old ejection's end")
				}
			}
			// Only the first set inherits: b left and came back is new.
			mustUpdate(t, d, state("a:1"))
			mustUpdate(t, d, state("a:1", "b:1"))
			if !statsOf(t, d, "b:1").Healthy {
				t.Errorf("b, back in a later set, unhealthy: it inherited from the old director again")
			}
		})
	}
}

// TestH1InheritSkipsSetless: a director that never got a set passes on
// what it was to inherit, so directors rebuilt reload after reload
// without a set never hold a chain of their predecessors.
func TestH1InheritSkipsSetless(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	old := newOutlierDirector(t, Config{HealthCheckInterval: time.Hour}, clk, "a:1", "b:1")
	setHealthOf(t, old, "b:1", false)
	newDir := func() *Director {
		d, err := New(Config{HealthCheckInterval: time.Hour, Logger: discardLogger(), Now: clk.Now})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	setless := newDir()
	setless.Inherit(old, true)
	d := newDir()
	d.Inherit(setless, true)
	if d.inherit != old {
		t.Fatalf("inherits from %p, want the set-less director's own %p", d.inherit, old)
	}
	mustUpdate(t, d, state("a:1", "b:1"))
	if statsOf(t, d, "b:1").Healthy {
		t.Error("b healthy, want the verdict of the last director that had a set")
	}
}
