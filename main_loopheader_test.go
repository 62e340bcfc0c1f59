package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/cluster"
)

// mdServer is a TestService backend that hands each EmptyCall's request
// metadata to seen.
type mdServer struct {
	testgrpc.UnimplementedTestServiceServer
	seen chan metadata.MD
}

func (m *mdServer) EmptyCall(ctx context.Context, _ *testgrpc.Empty) (*testgrpc.Empty, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	m.seen <- md
	return &testgrpc.Empty{}, nil
}

// TestLoopHeaderFlag: by default both engines send the backend a
// streamlb-via field naming the proxy (the forwarding-loop guard) in one
// request in 16, at random (proxy.loopMark), and in every request that
// arrives with one already, beside it; --loop-header=false sends none,
// and relays a client's field as it came. The calls go through either
// way.
func TestLoopHeaderFlag(t *testing.T) {
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	backend := &mdServer{seen: make(chan metadata.MD, 1)}
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, backend)
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)

	// 320 calls without a field: 20 marked on average; none with a
	// chance of 1e-9, 80 or more far less.
	const calls = 320
	for _, engine := range cluster.Engines() {
		for _, tc := range []struct {
			flag string
			on   bool
		}{{"", true}, {"--loop-header=false", false}, {"loop_header: true", true}, {"loop_header: false", false}} {
			t.Run(engine+" "+tc.flag, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				defer cancel()
				args := []string{"proxy", "--listen", "127.0.0.1:0", "--backend", ln.Addr().String(), "--engine", engine, "--log-format", "json"}
				if strings.HasPrefix(tc.flag, "--") {
					args = append(args, tc.flag)
				} else if tc.flag != "" {
					path := filepath.Join(t.TempDir(), "streamlb.yaml")
					data := fmt.Sprintf("listen: 127.0.0.1:0\nengine: %s\nproxy: {%s}\nclusters: [{name: a, targets: [%q]}]\nroutes: [{cluster: a}]\n", engine, tc.flag, ln.Addr().String())
					if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
						t.Fatal(err)
					}
					args = []string{"proxy", "--config", path, "--log-format", "json"}
				}
				app := startApp(ctx, t, args, "listening")
				addr := app.wait(ctx, t)["listening"].Addr
				cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
				if err != nil {
					t.Fatal(err)
				}
				defer cc.Close()
				client := testgrpc.NewTestServiceClient(cc)
				// fields makes one call, the client's own streamlb-via
				// field with it if carried, and returns the backend's.
				fields := func(carried bool) []string {
					cctx := ctx
					if carried {
						cctx = metadata.AppendToOutgoingContext(ctx, "streamlb-via", "ffeeddccbbaa9988")
					}
					if _, err := client.EmptyCall(cctx, &testgrpc.Empty{}); err != nil {
						t.Fatalf("call through the proxy: %v", err)
					}
					return (<-backend.seen).Get("streamlb-via")
				}
				marked := 0
				for range calls {
					switch got := fields(false); {
					case len(got) > 1 || len(got) == 1 && !tc.on:
						t.Fatalf("the backend got streamlb-via %v, want at most one field, none with the guard off", got)
					case len(got) == 1:
						marked++
					}
				}
				if tc.on && (marked == 0 || marked >= 80) {
					t.Errorf("%d of %d calls reached the backend with a streamlb-via field, want about 1 in 16", marked, calls)
				} else if !tc.on && marked != 0 {
					t.Errorf("%d calls reached the backend with a streamlb-via field, want none with the guard off", marked)
				}
				for range 20 {
					want := 1
					if tc.on {
						want = 2 // a marked request always gets this proxy's mark
					}
					if got := fields(true); len(got) != want || got[0] != "ffeeddccbbaa9988" {
						t.Fatalf("a call carrying another proxy's field reached the backend with streamlb-via %v, want that field and %d in all", got, want)
					}
				}
				if err := app.shutdown(t); err != nil {
					t.Errorf("proxy command returned %v", err)
				}
			})
		}
	}
}
