package director

import (
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
)

// TestHealthCheckZonedIPv6: the resolver accepts IPv6 addresses with a
// zone ("[fe80::1%eth0]:port"); health checks must work for them too, not
// give up on the backend because "%zone" is not a valid URL escape.
func TestHealthCheckZonedIPv6(t *testing.T) {
	t.Parallel()
	srv, err := testserver.New(testserver.Config{Name: "zoned", Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start("[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	t.Cleanup(srv.Stop)
	addr := testkit.Zoned(t, srv.Addr())
	other := startBackends(t, 1)
	d := newHealthDirector(t, Config{})
	mustUpdate(t, d, resolver.State{Addresses: []resolver.Address{{Addr: addr}, {Addr: other[0].Addr()}}})
	runDirector(t, d)
	srv.SetServing(false)
	waitFor(t, 5*time.Second, "zoned backend unhealthy", func() bool { return !healthyOf(d, addr) })
	srv.SetServing(true)
	waitFor(t, 5*time.Second, "zoned backend healthy again", func() bool { return healthyOf(d, addr) })
}
