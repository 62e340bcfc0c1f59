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

// TestLoopHeaderFlag: by default both engines send the backend one
// streamlb-via field naming the proxy (the forwarding-loop guard);
// --loop-header=false sends none, and the call still goes through.
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

	for _, engine := range cluster.Engines() {
		for _, tc := range []struct {
			flag string
			want int
		}{{"", 1}, {"--loop-header=false", 0}, {"loop_header: true", 1}, {"loop_header: false", 0}} {
			t.Run(engine+" "+tc.flag, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
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
				if _, err := testgrpc.NewTestServiceClient(cc).EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
					t.Fatalf("call through the proxy: %v", err)
				}
				md := <-backend.seen
				if got := len(md.Get("streamlb-via")); got != tc.want {
					t.Errorf("the backend got %d streamlb-via fields (%v), want %d", got, md.Get("streamlb-via"), tc.want)
				}
				if err := app.shutdown(t); err != nil {
					t.Errorf("proxy command returned %v", err)
				}
			})
		}
	}
}
