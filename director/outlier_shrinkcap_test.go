package director

import "testing"

// TestEjectionCapAfterShrink: MaxEjectionPercent is "the largest share of
// the set that may be ejected at once" (README: "never more than P% of
// backends"). Four backends at 50% may have two ejected; when the set then
// shrinks to three of them, two ejected would be 67%.
func TestEjectionCapAfterShrink(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	d := newOutlierDirector(t, Config{}, clk, "a:1", "b:1", "c:1", "d:1")
	failN(t, d, "a:1", errUnavailable, 3)
	failN(t, d, "b:1", errUnavailable, 3)
	if !statsOf(t, d, "a:1").Ejected || !statsOf(t, d, "b:1").Ejected {
		t.Fatal("a:1 and b:1 not ejected")
	}
	mustUpdate(t, d, state("a:1", "b:1", "c:1"))
	n := 0
	for _, b := range d.Backends() {
		if b.Ejected {
			n++
		}
	}
	if n*100 > 3*DefaultMaxEjectionPercent {
		t.Errorf("%d of 3 backends ejected after the set shrank, over max ejection percent %d", n, DefaultMaxEjectionPercent)
	}
}
