package cluster_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestS25LeastRequestCountsCallsAcrossFlap: three backends behind a DNS
// name, least_request; 30 long bidi calls spread over them. One backend
// leaves the DNS answer and comes back well within the drain timeout, so
// its calls run on. The director must still count them in flight on it:
// its in-flight counts match the calls actually on each backend, and 15
// more calls keep the spread even. Before, the backend came back with a
// count of 0 and drew about two thirds of the new calls until its count
// caught up with calls it already had. streamlb_calls_in_flight counts
// them too. Once every call ended, no count is left over. Both engines.
func TestS25LeastRequestCountsCallsAcrossFlap(t *testing.T) {
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) { testS25LeastRequestAcrossFlap(t, engine) })
	}
}

func testS25LeastRequestAcrossFlap(t *testing.T, engine string) {
	ctx := testkit.Context(t, 30*time.Second)
	ips := []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}
	dns := testserver.NewDNSServer(testserver.DNSConfig{DefaultTTL: 1, Logger: quiet})
	if err := dns.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dns.Stop)
	_, port, _ := net.SplitHostPort(testkit.FreeAddr(t))
	names := map[string]string{} // backend name -> address
	for i, ip := range ips {
		name := fmt.Sprintf("b%d", i)
		startBackend(t, name, ip+":"+port)
		names[name] = ip + ":" + port
	}
	dns.SetA("svc.s25.test.", ips...)
	r := runServer(t, cluster.ServerConfig{
		Engine:       engine,
		Metrics:      prometheus.NewRegistry(),
		DrainTimeout: 30 * time.Second,
		Cluster: cluster.Config{
			Targets:    []string{"dns://" + dns.Addr() + "/svc.s25.test:" + port},
			DNSRefresh: 50 * time.Millisecond,
			Director:   director.Config{Policy: director.LeastRequest},
		},
	})
	cl := r.srv.Cluster()
	setSize := func(n int) func() bool { return func() bool { return len(cl.Backends()) == n } }
	testkit.WaitFor(ctx, t, "three backends", setSize(3))
	client := dial(t, r.addr)

	type call struct {
		st      testgrpc.TestService_FullDuplexCallClient
		backend string
	}
	var calls []call
	open := func(n int) {
		for range n {
			st, err := client.FullDuplexCall(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}}); err != nil {
				t.Fatal(err)
			}
			if _, err := st.Recv(); err != nil {
				t.Fatal(err)
			}
			hdr, err := st.Header()
			if err != nil {
				t.Fatal(err)
			}
			calls = append(calls, call{st, names[testserver.BackendFromHeader(hdr)]})
		}
	}
	actual := func() map[string]int64 {
		m := map[string]int64{}
		for _, c := range calls {
			m[c.backend]++
		}
		return m
	}
	counted := func() map[string]int64 {
		m := map[string]int64{}
		for _, b := range cl.Backends() {
			m[b.Addr] = b.InFlight
		}
		return m
	}
	open(30)

	// b2 leaves the answer, and comes back.
	dns.SetA("svc.s25.test.", ips[:2]...)
	testkit.WaitFor(ctx, t, "b2 out of the set", setSize(2))
	dns.SetA("svc.s25.test.", ips...)
	testkit.WaitFor(ctx, t, "b2 back in the set", setSize(3))

	// Every call still runs (the drain timeout is far off).
	for i, c := range calls {
		if err := c.st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}}); err != nil {
			t.Fatalf("call %d on %s after the flap: send: %v", i, c.backend, err)
		}
		if _, err := c.st.Recv(); err != nil {
			t.Fatalf("call %d on %s after the flap: %v", i, c.backend, err)
		}
	}
	gauge := scrape(t, r.admin, "streamlb_calls_in_flight")
	for addr, n := range actual() {
		if got := counted()[addr]; got != n {
			t.Errorf("after the flap, the director counts %d calls in flight on %s, which has %d", got, addr, n)
		}
		if got := gauge["backend="+addr]; got != float64(n) {
			t.Errorf("after the flap, streamlb_calls_in_flight{backend=%q} = %v, want %d", addr, got, n)
		}
	}

	open(15)
	got := actual()
	lo, hi := int64(1<<62), int64(0)
	for _, addr := range names {
		lo, hi = min(lo, got[addr]), max(hi, got[addr])
	}
	// P2C over three backends never picks the one with the most calls
	// unless it ties; a spread of 4 or more is not least_request's.
	if hi-lo > 3 {
		t.Errorf("calls in flight per backend after 15 more least_request picks: %v (spread %d, want at most 3)", got, hi-lo)
	}

	for _, c := range calls {
		c.st.CloseSend()
		if _, err := c.st.Recv(); !errors.Is(err, io.EOF) {
			t.Errorf("call on %s: %v, want its end", c.backend, err)
		}
	}
	testkit.WaitFor(ctx, t, "no calls counted in flight", func() bool {
		for _, n := range counted() {
			if n != 0 {
				return false
			}
		}
		for _, n := range scrape(t, r.admin, "streamlb_calls_in_flight") {
			if n != 0 {
				return false
			}
		}
		return true
	})
}
