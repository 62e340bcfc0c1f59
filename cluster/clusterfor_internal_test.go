package cluster

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestClusterForManyClusters: clusterFor runs once per call (the
// call-end hook of the metrics and the access log) and current on every
// /readyz; with 2,000 clusters each routed once they walked the route
// table once per cluster, 2,000,000 comparisons: a call through the first
// route took 7 times as long end to end (128µs to 942µs on loopback),
// four tenths of the proxy's CPU in slices.Index. Now both read what
// buildTable worked out.
func TestClusterForManyClusters(t *testing.T) {
	const n = 2000
	var b strings.Builder
	b.WriteString("clusters:\n")
	for i := range n {
		fmt.Fprintf(&b, "  - {name: c%d, targets: [127.0.0.1:%d]}\n", i, 10000+i)
	}
	b.WriteString("routes:\n")
	for i := range n {
		fmt.Fprintf(&b, "  - {match: {service: s%d.S}, cluster: c%d}\n", i, i)
	}
	// A cluster routed twice is listed once, in first-route order.
	b.WriteString("  - {cluster: c0}\n")
	f, err := ParseFile("many.yaml", []byte(b.String()))
	if err != nil {
		t.Fatal(err)
	}
	s, err := newClusterSet(f, slog.New(slog.DiscardHandler), nil, nil, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	cs := s.current()
	if len(cs) != n || cs[0].Name() != "c0" || cs[n-1].Name() != fmt.Sprintf("c%d", n-1) {
		t.Fatalf("current() = %d clusters, first %s, want %d from c0 in route order", len(cs), cs[0].Name(), n)
	}
	if c := s.clusterFor("c1999", "127.0.0.1:1"); c == nil || c.Name() != "c1999" {
		t.Fatalf("clusterFor(c1999) = %v", c)
	}
	if c := s.clusterFor("gone", "127.0.0.1:1"); c != nil {
		t.Fatalf("clusterFor(gone) = %s, want nil", c.Name())
	}
	const rounds = 200
	start := time.Now()
	for range rounds {
		s.clusterFor("c1999", "127.0.0.1:1")
		s.current()
	}
	if per := time.Since(start) / rounds; per > 20*time.Microsecond {
		t.Errorf("clusterFor and current with %d clusters: %v per call, want under 20µs (they walked the routes once per cluster)", n, per)
	}
	if a := testing.AllocsPerRun(50, func() { s.clusterFor("c1999", "127.0.0.1:1") }); a != 0 {
		t.Errorf("clusterFor allocates %v times per call, want 0", a)
	}
}
