package proxy_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
)

// atk5ConfigFile is the path of a configuration file in a directory of
// the test's, and write, which replaces its content.
func atk5ConfigFile(t *testing.T) (path string, write func(string)) {
	path = filepath.Join(t.TempDir(), "streamlb.yaml")
	return path, func(s string) {
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// atk5Running is `streamlb proxy --config` under Run.
type atk5Running struct {
	srv    *cluster.Server
	addr   string
	cancel context.CancelFunc // ends Run's context: SIGTERM
	ran    <-chan error       // Run's result
}

// atk5StartFile starts `streamlb proxy --config` for the file at path on
// a loopback listener. Ending it is the caller's: cancel, then read ran.
func atk5StartFile(t *testing.T, path string) atk5Running {
	t.Helper()
	f, err := cluster.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.ServerConfig()
	cfg.Logger = quietLog
	srv, err := cluster.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- srv.Run(rctx, ln, nil) }()
	return atk5Running{srv: srv, addr: ln.Addr().String(), cancel: rcancel, ran: ran}
}

// stop ends Run's context and fails the test unless Run then returns nil
// within 30 s.
func (r atk5Running) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.ran:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Error("Run did not return within 30s")
	}
}

// atk5RunFile runs `streamlb proxy --config` for the file at path until
// the test ends (then stop), and returns the server and its address.
func atk5RunFile(t *testing.T, path string) (*cluster.Server, string) {
	t.Helper()
	r := atk5StartFile(t, path)
	t.Cleanup(func() { r.stop(t) })
	return r.srv, r.addr
}

// TestAtk5ReloadRemovesClusterWithWaitingCalls: cluster b's one backend
// takes one stream at a time, so calls routed to b queue in the proxy
// for its slot. A reload removes cluster b (or replaces its target).
// The calls running and waiting must end, OK or UNAVAILABLE, well
// before their deadline: none may wait for a slot of a pool no one
// looks after any more.
func TestAtk5ReloadRemovesClusterWithWaitingCalls(t *testing.T) {
	for _, change := range []string{"removed", "retargeted"} {
		t.Run(change, func(t *testing.T) {
			verifyNoLeaks(t)
			a := atk5Backend(t, "a", "127.0.0.1:0")
			cfgB := atk5Config("b")
			cfgB.ServerOptions = []grpc.ServerOption{grpc.MaxConcurrentStreams(1)}
			b := atk5BackendCfg(t, cfgB, "127.0.0.1:0")
			b2 := atk5Backend(t, "b2", "127.0.0.1:0")
			conf := func(bTarget string) string {
				s := fmt.Sprintf(`
listen: 127.0.0.1:0
admin_listen: ""
drain_timeout: 500ms
proxy: {max_backend_conns: 1}
clusters:
  - {name: a, targets: [%s]}
`, a.Addr())
				if bTarget != "" {
					return s + fmt.Sprintf("  - {name: b, targets: [%s]}\nroutes:\n  - {match: {headers: [{name: x-route, exact: b}]}, cluster: b}\n  - {cluster: a}\n", bTarget)
				}
				return s + "routes:\n  - {cluster: a}\n"
			}
			path, write := atk5ConfigFile(t)
			write(conf(b.Addr()))
			srv, addr := atk5RunFile(t, path)
			cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()
			client := testgrpc.NewTestServiceClient(cc)
			ctx := testkit.Context(t, 30*time.Second)
			bctx := metadata.AppendToOutgoingContext(ctx, "x-route", "b")
			const n = 6
			var wg sync.WaitGroup
			type out struct {
				err  error
				took time.Duration
			}
			outs := make(chan out, n)
			for i := 0; i < n; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					cctx, cancel := context.WithTimeout(bctx, 10*time.Second)
					defer cancel()
					start := time.Now()
					err := atk5OneMessage(cctx, client, []byte{byte(i), 1, 2, 3, 4, 5, 6, 7}, 100, 200_000)
					outs <- out{err, time.Since(start)}
				}()
			}
			time.Sleep(100 * time.Millisecond)
			if change == "removed" {
				write(conf(""))
			} else {
				write(conf(b2.Addr()))
			}
			if err := srv.Reload(ctx); err != nil {
				t.Fatal(err)
			}
			wg.Wait()
			close(outs)
			for o := range outs {
				t.Logf("call: %v after %v", o.err, o.took.Round(time.Millisecond))
				if o.err != nil && status.Code(o.err) != codes.Unavailable {
					t.Errorf("call: %v after %v", o.err, o.took)
				}
				if o.took > 5*time.Second {
					t.Errorf("call took %v", o.took)
				}
			}
		})
	}
}
