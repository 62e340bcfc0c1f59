package cluster_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestClientCancelsNeitherEjectNorFail: clients that give up on calls to
// healthy backends (a unary call cancelled before its answer, a server
// stream cancelled after its first message, a client connection closed
// with its call open) say nothing about those backends, as Envoy's
// outlier detection does not count downstream resets against the
// upstream: with ejection after 2 calls in a row and up to every backend
// ejectable, 12 cancels of each kind eject neither backend, and /backends
// counts them as no failure (nor success). A call after them is answered.
func TestClientCancelsNeitherEjectNorFail(t *testing.T) {
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			started := make(chan struct{}, 64)
			hang := testserver.Config{
				UnaryCallF: func(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
					started <- struct{}{}
					<-ctx.Done()
					return nil, ctx.Err()
				},
				StreamingOutputCallF: func(_ *testgrpc.StreamingOutputCallRequest, ss testgrpc.TestService_StreamingOutputCallServer) error {
					if err := ss.Send(&testgrpc.StreamingOutputCallResponse{}); err != nil {
						return err
					}
					started <- struct{}{}
					<-ss.Context().Done()
					return ss.Context().Err()
				},
			}
			hang.Name = "a"
			a := startBackendConfig(t, hang, "127.0.0.1:0")
			hang.Name = "b"
			b := startBackendConfig(t, hang, "127.0.0.1:0")
			r := runFile(t, writeConfig(t, t.TempDir(), fmt.Sprintf(`
engine: %s
clusters:
  - name: c
    targets: [%s, %s]
    policy: round_robin
    ejection: {after: 2, base: 1m, max_percent: 100}
routes:
  - {cluster: c}
`, engine, a.Addr(), b.Addr())), false)
			ctx := testkit.Context(t, 60*time.Second)
			client := dial(t, r.addr)
			wait := func(i int) {
				t.Helper()
				select {
				case <-started:
				case <-ctx.Done():
					t.Fatalf("call %d: the backend did not get it", i)
				}
			}
			const n = 12
			for i := range n { // unary, cancelled unanswered
				cctx, cancel := context.WithCancel(ctx)
				errc := make(chan error, 1)
				go func() {
					_, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{})
					errc <- err
				}()
				wait(i)
				cancel()
				<-errc
			}
			for i := range n { // server stream, cancelled after a message
				cctx, cancel := context.WithCancel(ctx)
				st, err := client.StreamingOutputCall(cctx, &testgrpc.StreamingOutputCallRequest{})
				if err != nil {
					t.Fatal(err)
				}
				if _, err := st.Recv(); err != nil {
					t.Fatalf("stream %d: Recv: %v", i, err)
				}
				wait(i)
				cancel()
			}
			for i := range n { // the client's connection closed mid-call
				cc, err := grpc.NewClient("passthrough:///"+r.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
				if err != nil {
					t.Fatal(err)
				}
				st, err := testgrpc.NewTestServiceClient(cc).StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
				if err != nil {
					t.Fatal(err)
				}
				if _, err := st.Recv(); err != nil {
					t.Fatalf("connection %d: Recv: %v", i, err)
				}
				wait(i)
				cc.Close()
			}
			var bs map[string][]map[string]any
			var body string
			testkit.WaitFor(ctx, t, "every call to end", func() bool {
				_, body = get(t, r.admin+"/backends")
				bs = nil
				if json.Unmarshal([]byte(body), &bs) != nil || len(bs["c"]) != 2 {
					return false
				}
				for _, be := range bs["c"] {
					if be["in_flight"] != float64(0) {
						return false
					}
				}
				return true
			})
			for _, be := range bs["c"] {
				if be["ejected"] != false || be["ejections"] != float64(0) || be["failures"] != float64(0) || be["successes"] != float64(0) {
					t.Errorf("/backends = %s: want %v not ejected, with 0 ejections, 0 failures and 0 successes after %d client cancels", body, be["addr"], 3*n)
				}
			}
			if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Errorf("EmptyCall after the cancels: %v", err)
			}
		})
	}
}
