package proxy_test

import (
	"net"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
)

// TestReferenceZonedIPv6: the resolver accepts IPv6 addresses with a zone
// ("[fe80::1%eth0]:port"), and the grpc-proxy engine must reach such a
// backend: its grpc-go client's target is a URL, in which "%lo" is an
// invalid escape, so every call to the backend failed.
func TestReferenceZonedIPv6(t *testing.T) {
	ts, err := testserver.New(testserver.Config{Name: "zoned", Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start("[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	t.Cleanup(ts.Stop)
	addr := testkit.Zoned(t, ts.Addr())
	d, err := director.New(director.Config{Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.UpdateState(resolver.State{Addresses: []resolver.Address{{Addr: addr}}}); err != nil {
		t.Fatal(err)
	}
	srv, err := proxy.NewReference(proxy.ReferenceConfig{Picker: d, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveOn(t, srv, ln)
	e := &env{t: t}
	client := testgrpc.NewTestServiceClient(e.dial(ln.Addr().String()))
	ctx := testkit.Context(t, 10*time.Second)
	if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("call to the backend at %s: %v", addr, err)
	}
}
