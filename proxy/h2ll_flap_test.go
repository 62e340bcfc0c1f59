package proxy_test

import (
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/status"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestH2llBackendBackInSetNotCut: a long bidi stream runs on a backend
// that leaves the set (a DNS answer without it, a registry blip) and is
// back in the next set, well within the drain timeout. The backend is in
// the set when the drain timeout passes, so the stream has no reason to
// be cut "because the backend left the set": it must run on to its end.
func TestH2llBackendBackInSetNotCut(t *testing.T) {
	verifyNoLeaks(t)
	const drainTimeout = 300 * time.Millisecond
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.DrainTimeout = drainTimeout }})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 20*time.Second)
	b0 := e.backends[0].Addr()

	st, err := e.client.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ping := func(i int) error {
		if err := st.Send(&testgrpc.StreamingOutputCallRequest{
			ResponseParameters: []*testgrpc.ResponseParameters{{Size: 100}},
		}); err != nil {
			_, err = st.Recv() // the call's status
			return err
		}
		_, err := st.Recv()
		return err
	}
	if err := ping(0); err != nil {
		t.Fatal(err)
	}
	// The backend leaves the set, and is back 50ms later.
	srv.RetainBackends(nil)
	time.Sleep(50 * time.Millisecond)
	srv.RetainBackends([]string{b0})
	// The stream goes on for three drain timeouts.
	end := time.Now().Add(3 * drainTimeout)
	for i := 1; time.Now().Before(end); i++ {
		if err := ping(i); err != nil {
			t.Fatalf("message %d, %v after the backend came back: %v", i, time.Since(end.Add(-3*drainTimeout)).Round(time.Millisecond), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err == nil {
		t.Fatal("an answer after CloseSend")
	}
}

// TestH2llUpstreamLeftUnionKeeps: two Upstreams (clusters) list one
// backend; the first's set loses it (RetainUpstreamBackends), the second's
// keeps it, so the union of the sets (RetainBackends, called on every
// update of any cluster) still has it. The first Upstream's connection is
// drained within the drain timeout: the union keeping the address must
// not lift that bound. When the first Upstream's own set takes the
// backend back, the bound goes.
func TestH2llUpstreamLeftUnionKeeps(t *testing.T) {
	verifyNoLeaks(t)
	const drainTimeout = 300 * time.Millisecond
	var dialsA, dialsB atomic.Int64
	upA := countingUpstream(t, "a", &dialsA)
	upB := countingUpstream(t, "b", &dialsB)
	var backend string
	p := &upstreamPicker{pick: func([]string) (string, *proxy.Upstream) { return backend, upA }}
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.Picker = p; c.DrainTimeout = drainTimeout }})
	backend = e.backends[0].Addr()
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 20*time.Second)
	for _, back := range []bool{false, true} {
		st, err := e.client.FullDuplexCall(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ping := func() error {
			if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}}); err != nil {
				_, err = st.Recv()
				return err
			}
			_, err := st.Recv()
			return err
		}
		if err := ping(); err != nil {
			t.Fatal(err)
		}
		srv.RetainUpstreamBackends(upA, nil)               // a's set lost the backend
		srv.RetainBackends([]string{backend})              // the union: b still lists it
		srv.RetainUpstreamBackends(upB, []string{backend}) // b's update
		srv.RetainBackends([]string{backend})              // the union again, on b's update
		if back {
			srv.RetainUpstreamBackends(upA, []string{backend}) // a's set has it again
		}
		var cut error
		end := time.Now().Add(3 * drainTimeout)
		for cut == nil && time.Now().Before(end) {
			cut = ping()
			time.Sleep(20 * time.Millisecond)
		}
		switch {
		case !back && cut == nil:
			t.Errorf("a's connection to a backend a's set lost ran %v past the drain timeout: the union lifted a's bound", 3*drainTimeout)
		case !back && !strings.Contains(status.Convert(cut).Message(), "drain timeout"):
			t.Errorf("a's stream ended with %v, want UNAVAILABLE naming the drain timeout", cut)
		case back && cut != nil:
			t.Errorf("a's stream on a backend back in a's set: %v", cut)
		}
		if back {
			st.CloseSend()
			st.Recv()
		}
	}
}
