package cluster_test

import (
	"crypto/tls"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestReloadBackendTLSPerEngine moves a cluster's backends from
// cleartext to TLS by a reload that sets the top-level backend_tls, which
// README does not list among the settings that need a restart. With
// either engine the reload must either be applied (calls reach the TLS
// backend) or be refused with the running configuration kept (calls
// still reach the cleartext one); it must not be accepted and then dial
// the TLS backend in cleartext. The same for a file that also says
// engine: frame and gives the cluster its own backend_tls while the
// grpc-proxy engine runs.
func TestReloadBackendTLSPerEngine(t *testing.T) {
	ca := newCA(t, "backend-ca")
	a := startBackend(t, "a", "127.0.0.1:0")
	b, err := testserver.New(testserver.Config{Name: "b", Logger: quiet,
		ServerOptions: []grpc.ServerOption{grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{ca.keyPair(t, "b", true)}}))}})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Stop)
	for _, engine := range cluster.Engines() {
		for _, variant := range []string{"top-level", "own-engine-frame"} {
			t.Run(engine+"/"+variant, func(t *testing.T) {
				dir := t.TempDir()
				caFile := writeFile(t, dir, "ca.crt", ca.pem)
				path := writeConfig(t, dir, fmt.Sprintf("engine: %s\nclusters: [{name: x, targets: [%s]}]\nroutes: [{cluster: x}]\n", engine, a.Addr()))
				r := runFile(t, path, false)
				client := dial(t, r.addr)
				ctx := testkit.Context(t, 20*time.Second)
				if got, err := backendOf(ctx, client); got != "a" {
					t.Fatalf("first call went to %q (%v), want a", got, err)
				}
				next := fmt.Sprintf("engine: %s\nbackend_tls: {ca: %s, server_name: localhost}\nclusters: [{name: x, targets: [%s]}]\nroutes: [{cluster: x}]\n", engine, caFile, b.Addr())
				if variant != "top-level" {
					next = fmt.Sprintf("engine: frame\nclusters: [{name: x, targets: [%s], backend_tls: {ca: %s, server_name: localhost}}]\nroutes: [{cluster: x}]\n", b.Addr(), caFile)
				}
				writeConfig(t, dir, next)
				want := "b"
				if err := r.srv.Reload(ctx); err != nil {
					t.Logf("reload refused: %v", err)
					want = "a"
				}
				for range 3 {
					got, err := backendOf(ctx, client)
					if got != want {
						msg := fmt.Sprint(err)
						t.Fatalf("after the reload (accepted: %v) a call went to %q (%s), want %s", want == "b", got, msg[:min(len(msg), 300)], want)
					}
				}
			})
		}
	}
}
