package testkit

import (
	"net"
	"net/netip"
	"testing"
)

// Zoned returns addr, an IPv6 loopback address with its port ("[::1]:N"),
// with the loopback interface's name as its zone ("[::1%lo]:N"), the form
// the resolver accepts for link-local addresses. It skips t where there is
// no loopback interface or the zoned address cannot be dialled.
func Zoned(t testing.TB, addr string) string {
	t.Helper()
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
	ap := netip.MustParseAddrPort(addr)
	zoned := netip.AddrPortFrom(ap.Addr().WithZone(zone), ap.Port()).String()
	c, err := net.Dial("tcp", zoned)
	if err != nil {
		t.Skipf("cannot dial %s: %v", zoned, err)
	}
	c.Close()
	return zoned
}
