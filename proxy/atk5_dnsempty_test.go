package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAtk5DNSEmptiesAndReturns: a cluster on a DNS name; long
// byte-exact streams run when the name stops existing (NXDOMAIN: the set
// empties) and comes back. The streams in flight finish byte-exact (their
// backends are drained, not cut); calls made while the set is empty fail
// fast with UNAVAILABLE, never wait for their deadline; calls after the
// name is back succeed.
func TestAtk5DNSEmptiesAndReturns(t *testing.T) {
	verifyNoLeaks(t)
	atk5Resources(t)
	ctx := testkit.Context(t, 60*time.Second)
	ips := []string{"127.0.0.1", "127.0.0.2"}
	dns, port, _ := atk5DNSBackends(t, ips...)
	path, write := atk5ConfigFile(t)
	write(fmt.Sprintf(`
listen: 127.0.0.1:0
admin_listen: ""
drain_timeout: 20s
clusters:
  - {name: a, targets: ["dns://%s/svc.atk5.test:%s"], dns_refresh: 100ms}
routes:
  - {cluster: a}
`, dns.Addr(), port))
	_, addr := atk5RunFile(t, path)
	client := atk5Dial(t, addr, 0)
	testkit.WaitFor(ctx, t, "the cluster to answer", func() bool {
		_, err := client.EmptyCall(ctx, &testgrpc.Empty{})
		return err == nil
	})
	// Long streams: 15 messages 100ms apart.
	var wg sync.WaitGroup
	long := make(chan atk5Result, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(i), 3))
			st, err := client.FullDuplexCall(ctx)
			if err != nil {
				long <- atk5Result{kind: "long bidi", err: err}
				return
			}
			for j := 0; j < 15; j++ {
				b := atk5RandBody(r, atk5Sizes[r.IntN(len(atk5Sizes))])
				if err := st.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: b}}); err != nil {
					_, err = st.Recv()
					long <- atk5Result{kind: "long bidi", err: err}
					return
				}
				m, err := st.Recv()
				if err != nil {
					long <- atk5Result{kind: "long bidi", err: err}
					return
				}
				if atk5Sum(m.GetPayload().GetBody()) != atk5Sum(b) {
					long <- atk5Result{kind: "long bidi", corrupt: fmt.Sprintf("message %d", j)}
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
			st.CloseSend()
			_, err = st.Recv()
			if errors.Is(err, io.EOF) {
				err = nil
			} else if err == nil {
				err = fmt.Errorf("an answer after CloseSend")
			}
			long <- atk5Result{kind: "long bidi", err: err}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	dns.Remove("svc.atk5.test.")
	// Once the set is empty, calls fail fast.
	deadline := time.Now().Add(5 * time.Second)
	sawEmpty := false
	for time.Now().Before(deadline) {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		start := time.Now()
		_, err := client.EmptyCall(cctx, &testgrpc.Empty{})
		cancel()
		if err != nil {
			if status.Code(err) != codes.Unavailable {
				t.Errorf("call with the set empty: %v, want UNAVAILABLE", err)
			}
			if took := time.Since(start); took > time.Second {
				t.Errorf("call with the set empty took %v to fail", took)
			}
			sawEmpty = true
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !sawEmpty {
		t.Error("the proxy never emptied the set after NXDOMAIN")
	}
	time.Sleep(200 * time.Millisecond)
	dns.SetA("svc.atk5.test.", ips[1])
	testkit.WaitFor(ctx, t, "the cluster to answer again", func() bool {
		_, err := client.EmptyCall(ctx, &testgrpc.Empty{})
		return err == nil
	})
	wg.Wait()
	close(long)
	for r := range long {
		if r.err != nil || r.corrupt != "" {
			t.Errorf("long stream across the empty set: %v %s", r.err, r.corrupt)
		}
	}
}
