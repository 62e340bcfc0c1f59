package proxy

import (
	"testing"
	"time"
)

// TestParkGCDue: the GC for parked readers' stacks runs once a burst of
// at least parkGCAfter parks has ended (two looks in a row that found no
// new park), and at most once per parkGCEvery.
func TestParkGCDue(t *testing.T) {
	t.Parallel()
	var p parker
	p.init(nil)
	t0 := time.Unix(1000, 0)
	steps := []struct {
		name  string
		parks int // parks since the previous look
		at    time.Duration
		want  bool
	}{
		{"few parks", 10, 0, false},
		{"quiet, too few", 0, time.Second, false},
		{"quiet again, too few", 0, 1500 * time.Millisecond, false},
		{"burst goes on", parkGCAfter, 2 * time.Second, false},
		{"one quiet look", 0, 3 * time.Second, false},
		{"a late wave", 10, 4 * time.Second, false},
		{"quiet", 0, 5 * time.Second, false},
		{"quiet twice: burst ended", 0, 6 * time.Second, true},
		{"counted as done", 0, 7 * time.Second, false},
		{"next burst", parkGCAfter, 8 * time.Second, false},
		{"ended", 0, 9 * time.Second, false},
		{"ended, but too soon", 0, 10 * time.Second, false},
		{"later", 0, 6*time.Second + parkGCEvery, true},
		{"a burst that never pauses", parkGCAfter, 7*time.Second + 2*parkGCEvery, false},
		{"still going", 1, 8*time.Second + 2*parkGCEvery, false},
	}
	for _, st := range steps {
		p.mu.Lock()
		p.parks += st.parks
		p.mu.Unlock()
		if got := p.gcDue(t0.Add(st.at)); got != st.want {
			t.Errorf("%s: gcDue = %v, want %v", st.name, got, st.want)
		}
	}
}
