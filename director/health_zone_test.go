package director

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
)

// TestHealthCheckZonedIPv6: the resolver accepts IPv6 addresses with a
// zone ("[fe80::1%eth0]:port"); health checks must work for them too, not
// give up on the backend because "%zone" is not a valid URL escape.
func TestHealthCheckZonedIPv6(t *testing.T) {
	t.Parallel()
	var zone string
	if ifs, err := net.Interfaces(); err == nil {
		for _, ifc := range ifs {
			if ifc.Flags&net.FlagLoopback != 0 {
				zone = ifc.Name
				break
			}
		}
	}
	if zone == "" {
		t.Skip("no loopback interface")
	}
	srv, err := testserver.New(testserver.Config{Name: "zoned", Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start("[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	t.Cleanup(srv.Stop)
	ap := netip.MustParseAddrPort(srv.Addr())
	addr := netip.AddrPortFrom(ap.Addr().WithZone(zone), ap.Port()).String()
	if c, err := net.Dial("tcp", addr); err != nil {
		t.Skipf("cannot dial %s: %v", addr, err)
	} else {
		c.Close()
	}
	other := startBackends(t, 1)
	d := newHealthDirector(t, Config{})
	mustUpdate(t, d, resolver.State{Addresses: []resolver.Address{{Addr: addr}, {Addr: other[0].Addr()}}})
	runDirector(t, d)
	srv.SetServing(false)
	waitFor(t, 5*time.Second, "zoned backend unhealthy", func() bool { return !healthyOf(d, addr) })
	srv.SetServing(true)
	waitFor(t, 5*time.Second, "zoned backend healthy again", func() bool { return healthyOf(d, addr) })
}
