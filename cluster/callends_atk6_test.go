package cluster_test

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk6CallEndsTellTheTruth ends one call in each way a client can see
// and compares, for both engines, what the client got with the access-log
// line and the per-backend metrics: one line, the client's code, the
// backend; started equal to finished under that code; nothing left in
// flight; the client connection gauge back to 0 once the client left.
func TestAtk6CallEndsTellTheTruth(t *testing.T) {
	hangMD := func(ctx context.Context) context.Context {
		return metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1")
	}
	waitIn := func(ctx context.Context, t *testing.T, ts *testserver.Server) {
		testkit.WaitFor(ctx, t, "the call to reach the backend", func() bool { return ts.InFlight() == 1 })
	}
	for _, tc := range []struct {
		name string
		// run makes the call and returns the code the client got; want is
		// the code the proxy must report when it differs from that.
		run  func(ctx context.Context, t *testing.T, client testgrpc.TestServiceClient, ts *testserver.Server) codes.Code
		want codes.Code
		any  bool // the client's own code may differ (it gave up first)
	}{
		{name: "ok", run: func(ctx context.Context, t *testing.T, client testgrpc.TestServiceClient, _ *testserver.Server) codes.Code {
			_, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 10})
			return status.Code(err)
		}},
		{name: "backend status", run: func(ctx context.Context, t *testing.T, client testgrpc.TestServiceClient, _ *testserver.Server) codes.Code {
			_, err := client.UnaryCall(metadata.AppendToOutgoingContext(ctx, testserver.MetadataFailCode, "5"), &testgrpc.SimpleRequest{})
			return status.Code(err)
		}},
		{name: "client cancels unary", run: func(ctx context.Context, t *testing.T, client testgrpc.TestServiceClient, ts *testserver.Server) codes.Code {
			cctx, cancel := context.WithCancel(hangMD(ctx))
			res := make(chan error, 1)
			go func() { _, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{}); res <- err }()
			waitIn(ctx, t, ts)
			cancel()
			return status.Code(<-res)
		}},
		{name: "client cancels stream after a message", run: func(ctx context.Context, t *testing.T, client testgrpc.TestServiceClient, ts *testserver.Server) codes.Code {
			cctx, cancel := context.WithCancel(ctx)
			st, err := client.FullDuplexCall(cctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := st.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}); err != nil {
				t.Fatal(err)
			}
			if _, err := st.Recv(); err != nil {
				t.Fatal(err)
			}
			cancel()
			_, err = st.Recv()
			return status.Code(err)
		}},
		{name: "deadline", want: codes.DeadlineExceeded, run: func(ctx context.Context, t *testing.T, client testgrpc.TestServiceClient, _ *testserver.Server) codes.Code {
			dctx, cancel := context.WithTimeout(hangMD(ctx), 300*time.Millisecond)
			defer cancel()
			_, err := client.UnaryCall(dctx, &testgrpc.SimpleRequest{})
			return status.Code(err)
		}},
		{name: "backend stops", run: func(ctx context.Context, t *testing.T, client testgrpc.TestServiceClient, ts *testserver.Server) codes.Code {
			res := make(chan error, 1)
			go func() { _, err := client.UnaryCall(hangMD(ctx), &testgrpc.SimpleRequest{}); res <- err }()
			waitIn(ctx, t, ts)
			ts.Stop()
			return status.Code(<-res)
		}},
		{name: "client connection closed", want: codes.Canceled, any: true, run: func(ctx context.Context, t *testing.T, _ testgrpc.TestServiceClient, ts *testserver.Server) codes.Code {
			return codes.Canceled
		}},
	} {
		for _, engine := range cluster.Engines() {
			t.Run(tc.name+"/"+engine, func(t *testing.T) {
				ts := startBackend(t, "a", "127.0.0.1:0")
				al, logPath := openJSONLog(t)
				r := runServer(t, cluster.ServerConfig{Engine: engine, Metrics: prometheus.NewRegistry(), AccessLog: al,
					Cluster: cluster.Config{Name: "echo", Targets: []string{ts.Addr()}}})
				ctx := testkit.Context(t, 20*time.Second)
				cc, err := grpc.NewClient("passthrough:///"+r.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
				if err != nil {
					t.Fatal(err)
				}
				defer cc.Close()
				client := testgrpc.NewTestServiceClient(cc)
				var got codes.Code
				if tc.name == "client connection closed" {
					res := make(chan error, 1)
					go func() { _, err := client.UnaryCall(hangMD(ctx), &testgrpc.SimpleRequest{}); res <- err }()
					testkit.WaitFor(ctx, t, "the call to reach the backend", func() bool { return ts.InFlight() == 1 })
					cc.Close()
					got = status.Code(<-res)
				} else {
					got = tc.run(ctx, t, client, ts)
				}
				want := got
				if tc.want != 0 && (tc.any || got == tc.want) {
					want = tc.want
				}
				if !tc.any && tc.want != 0 && got != tc.want {
					t.Errorf("client got %v, want %v", got, tc.want)
				}
				cc.Close()
				var lines []accessLine
				testkit.WaitFor(ctx, t, "the call's line", func() bool {
					lines = readAccessLog(t, logPath)
					return len(lines) >= 1
				})
				assertSettled(ctx, t, r.admin)
				testkit.WaitFor(ctx, t, "the client connection to close", func() bool {
					if engine != cluster.EngineFrame {
						return true
					}
					return scrape(t, r.admin, "streamlb_client_connections")[""] == 0
				})
				lines = readAccessLog(t, logPath)
				if len(lines) != 1 {
					t.Fatalf("%d lines, want 1: %+v", len(lines), lines)
				}
				l := lines[0]
				if l.Code != want.String() || l.Backend != ts.Addr() || l.Cluster != "echo" {
					t.Errorf("line: code %s backend %s cluster %s, want %v from %s in echo", l.Code, l.Backend, l.Cluster, want, ts.Addr())
				}
				fin := scrape(t, r.admin, "streamlb_calls_finished_total")
				if v := fin["backend="+ts.Addr()+",code="+want.String()]; v != 1 {
					t.Errorf("calls_finished_total = %v, want 1 under code %v", nonZero(fin), want)
				}
				if v := scrape(t, r.admin, "streamlb_calls_started_total")["backend="+ts.Addr()]; v != 1 {
					t.Errorf("calls_started_total = %v, want 1", v)
				}
				if engine == cluster.EngineFrame {
					in := scrape(t, r.admin, "streamlb_request_bytes_total")["backend="+ts.Addr()]
					out := scrape(t, r.admin, "streamlb_response_bytes_total")["backend="+ts.Addr()]
					if in != float64(l.BytesIn) || out != float64(l.BytesOut) {
						t.Errorf("bytes metrics in %v out %v, log in %d out %d", in, out, l.BytesIn, l.BytesOut)
					}
				}
			})
		}
	}
}

func nonZero(m map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for k, v := range m {
		if v != 0 {
			out[k] = v
		}
	}
	return out
}
