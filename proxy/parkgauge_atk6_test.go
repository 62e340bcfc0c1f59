//go:build linux

package proxy_test

import (
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestAtk6ParkedGaugeReturns: clients that park and then leave, politely
// or by a bare TCP close, take the connection gauges back to 0.
func TestAtk6ParkedGaugeReturns(t *testing.T) {
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.ParkAfter = 50 * time.Millisecond }})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 20*time.Second)
	if _, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	const n = 4
	var raws []*rawConn
	for range n {
		cc := e.dial(e.addr)
		if _, err := testgrpc.NewTestServiceClient(cc).EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
		raws = append(raws, dialRaw(t, e.addr))
		defer cc.Close()
	}
	testkit.WaitFor(ctx, t, "every connection to park", func() bool {
		st := srv.Stats()
		return st.ClientConns == 2*n+1 && st.ClientConnsParked == 2*n+1
	})
	for _, r := range raws {
		r.nc.Close()
	}
	e.cc.Close()
	testkit.WaitFor(ctx, t, "the closed connections to leave the gauges", func() bool {
		st := srv.Stats()
		return st.ClientConns == n && st.ClientConnsParked == n
	})
}
