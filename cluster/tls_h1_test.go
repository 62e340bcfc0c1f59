package cluster_test

import (
	"crypto/tls"
	"os"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/cluster"
)

// TestH1ClientCABundleHalfWritten: the client CA bundle (CA 1 and CA 2)
// is rewritten in place, and a client connects while the write is
// halfway: the file holds CA 1 whole and CA 2 cut off in its middle.
// That is a file that does not load, like a certificate and a key from
// different updates (README, TLS: "logged at Error and the ones in use
// are kept"); taken instead, as CA 1 alone (x509's AppendCertsFromPEM
// stops at the cut and keeps what came before), it refuses the clients of
// CA 2 until the next read, a second later at least.
func TestH1ClientCABundleHalfWritten(t *testing.T) {
	ca, ca1, ca2 := newCA(t, "ca"), newCA(t, "client-ca-1"), newCA(t, "client-ca-2")
	st := serverFiles(t, ca)
	bundle := append(append([]byte{}, ca1.pem...), ca2.pem...)
	st.ClientCAFile = writeFile(t, t.TempDir(), "ca.crt", bundle)
	ts := startBackend(t, "a", "127.0.0.1:0")
	r := runServer(t, cluster.ServerConfig{TLS: &st, Cluster: cluster.Config{Targets: []string{ts.Addr()}}})
	call := func() error {
		client := dialTLS(t, r.addr, &tls.Config{RootCAs: ca.pool(), Certificates: []tls.Certificate{ca2.keyPair(t, "client", false)}})
		_, err := client.EmptyCall(t.Context(), &testgrpc.Empty{})
		return err
	}
	if err := call(); err != nil {
		t.Fatalf("client of CA 2 before the rewrite: %v", err)
	}
	half := bundle[:len(ca1.pem)+len(ca2.pem)/2]
	if err := os.WriteFile(st.ClientCAFile, half, 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(cluster.ReloadInterval + 100*time.Millisecond)
	if err := call(); err != nil {
		t.Errorf("client of CA 2 while the bundle is half written: %v; want the bundle in use kept", err)
	}
	// The write completes, with a third CA: taken at the next read.
	ca3 := newCA(t, "client-ca-3")
	if err := os.WriteFile(st.ClientCAFile, append(bundle, ca3.pem...), 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(cluster.ReloadInterval + 100*time.Millisecond)
	client := dialTLS(t, r.addr, &tls.Config{RootCAs: ca.pool(), Certificates: []tls.Certificate{ca3.keyPair(t, "client", false)}})
	if _, err := client.EmptyCall(t.Context(), &testgrpc.Empty{}); err != nil {
		t.Errorf("client of CA 3 once the bundle is whole: %v", err)
	}
}
