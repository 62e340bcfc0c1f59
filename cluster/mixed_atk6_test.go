package cluster_test

import (
	"context"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk6MixedEndings runs calls that end every which way at once
// (success, backend status, UNAVAILABLE retried, client cancel, deadline,
// a backend that refuses connections) and then checks the books: one access-log
// line per call with the code its client got, per backend calls finished
// equal to calls started, nothing in flight, retries as the lines say.
// STREAMLB_ATTACKS=1 runs it longer.
func TestAtk6MixedEndings(t *testing.T) {
	calls, workers := 120, 6
	if os.Getenv("STREAMLB_ATTACKS") != "" {
		calls, workers = 2000, 16
	}
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			var targets []string
			var backends []*testserver.Server
			for i, name := range []string{"a", "b", "flaky", "doomed"} {
				cfg := testserver.Config{Name: name, Logger: quiet}
				if i == 2 {
					cfg.ErrorRate = 0.5
				}
				ts, err := testserver.New(cfg)
				if err != nil {
					t.Fatal(err)
				}
				if err := ts.Start("127.0.0.1:0"); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(ts.Stop)
				backends = append(backends, ts)
				targets = append(targets, ts.Addr())
			}
			al, logPath := openJSONLog(t)
			r := runServer(t, cluster.ServerConfig{Engine: engine, Metrics: prometheus.NewRegistry(), AccessLog: al,
				Cluster: cluster.Config{Name: "echo", Targets: targets, Director: director.Config{EjectAfter: -1}},
				Proxy:   proxy.Config{RetryOn: []string{"/grpc.testing.TestService/"}}})
			client := dial(t, r.addr)
			ctx := testkit.Context(t, 60*time.Second)
			var mu sync.Mutex
			seen := map[string]int{} // client codes
			jobs := make(chan int)
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rnd := rand.New(rand.NewPCG(uint64(w), 6))
					for range jobs {
						cctx, cancel := context.WithCancel(ctx)
						switch rnd.IntN(6) {
						case 0:
							cctx = metadata.AppendToOutgoingContext(cctx, testserver.MetadataFailCode, "5")
						case 1:
							cctx = metadata.AppendToOutgoingContext(cctx, testserver.MetadataHang, "1")
							time.AfterFunc(time.Duration(1+rnd.IntN(20))*time.Millisecond, cancel)
						case 2:
							var c2 context.CancelFunc
							cctx, c2 = context.WithTimeout(metadata.AppendToOutgoingContext(cctx, testserver.MetadataHang, "1"), time.Duration(5+rnd.IntN(30))*time.Millisecond)
							defer c2()
						case 3:
							cctx = metadata.AppendToOutgoingContext(cctx, testserver.MetadataDelay, "10ms")
						}
						var err error
						if rnd.IntN(2) == 0 {
							_, err = client.UnaryCall(cctx, &testgrpc.SimpleRequest{ResponseSize: int32(rnd.IntN(2000))}, grpc.WaitForReady(true))
						} else {
							var st testgrpc.TestService_FullDuplexCallClient
							if st, err = client.FullDuplexCall(cctx); err == nil {
								for range rnd.IntN(3) {
									st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 100}}})
								}
								st.CloseSend()
								for err == nil {
									_, err = st.Recv()
								}
								if err.Error() == "EOF" {
									err = nil
								}
							}
						}
						cancel()
						mu.Lock()
						seen[status.Code(err).String()]++
						mu.Unlock()
					}
				}()
			}
			// doomed refuses connections: its picks are retried
			// elsewhere. (Stopped under calls that hang, it raced their
			// clients' deadlines: a status on the wire as the client gives
			// up is logged as sent, which no proxy can help.)
			backends[3].Stop()
			for i := range calls {
				jobs <- i
			}
			close(jobs)
			wg.Wait()

			// A call its client cancels may never leave the client (grpc-go
			// checks the context before it sends the request headers): the
			// log may lack some Canceled calls, and only those.
			var lines []accessLine
			wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
			defer wcancel()
			for lines = readAccessLog(t, logPath); len(lines) < calls-seen["Canceled"]; lines = readAccessLog(t, logPath) {
				select {
				case <-wctx.Done():
					t.Fatalf("%d lines for %d calls, %d of them cancelled by their clients", len(lines), calls, seen["Canceled"])
				case <-time.After(20 * time.Millisecond):
				}
			}
			assertSettled(ctx, t, r.admin)
			lines = readAccessLog(t, logPath)
			logged := map[string]int{}
			retriesOK, retriesNo := 0, 0
			for _, l := range lines {
				logged[l.Code]++
				if l.Code == "OK" {
					retriesOK += l.Retries
				} else {
					retriesNo += l.Retries
				}
			}
			if missing := calls - len(lines); missing < 0 || missing > seen["Canceled"] {
				t.Errorf("%d lines for %d calls; clients got %v, the log says %v", len(lines), calls, seen, logged)
			}
			// A client whose deadline passed may see DEADLINE_EXCEEDED for
			// a call the proxy saw it cancel a moment earlier: compare the
			// two together, the calls missing from the log with them.
			logged["Canceled"] += calls - len(lines)
			for _, m := range []map[string]int{seen, logged} {
				m["DeadlineExceeded"] += m["Canceled"]
				delete(m, "Canceled")
			}
			// And a client that gives up just as the proxy sends a status
			// (a fast UNAVAILABLE, doomed's refused dial through the
			// grpc-proxy engine) sees its own code for a status on the
			// wire, which no proxy can know: a few such calls are
			// allowed, not a systematic mislabel.
			slack := max(2, calls/100)
			for _, code := range []string{"OK", "NotFound", "Unavailable", "DeadlineExceeded", "Internal", "Unknown"} {
				if d := logged[code] - seen[code]; d > slack || d < -slack {
					t.Errorf("clients got %v; the log says %v", seen, logged)
					break
				}
			}
			if seen["OK"] != logged["OK"] || seen["NotFound"] != logged["NotFound"] {
				t.Errorf("clients got %v; the log says %v (OK and NotFound never race)", seen, logged)
			}
			got := scrape(t, r.admin, "streamlb_retries_total")
			if got["outcome=ok"] != float64(retriesOK) || got["outcome=failed"] != float64(retriesNo) {
				t.Errorf("streamlb_retries_total %v; the lines show %d ok, %d failed", got, retriesOK, retriesNo)
			}
			t.Logf("client codes %v", seen)
		})
	}
}
