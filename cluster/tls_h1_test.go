package cluster_test

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
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

// TestH1CertRotationInPlaceUnderLoad rotates the listener's certificate
// and key in place, the certificate first and the key 300ms later (so a
// read in between finds a pair that does not match), six times, while
// two clients open a new TLS connection for every call: no handshake
// may fail, and the new certificate is served once both files are
// written.
func TestH1CertRotationInPlaceUnderLoad(t *testing.T) {
	ca := newCA(t, "ca")
	st := serverFiles(t, ca)
	ts := startBackend(t, "a", "127.0.0.1:0")
	r := runServer(t, cluster.ServerConfig{TLS: &st, Cluster: cluster.Config{Targets: []string{ts.Addr()}}})
	ctx := testkit.Context(t, 60*time.Second)
	var mu sync.Mutex
	serials := map[string]bool{} // the leaf serials clients were shown
	var calls, fails atomic.Int64
	var firstErr atomic.Value
	// call makes one call on a new TLS connection, noting the
	// certificate it was shown; false if the connection could not be set up.
	call := func() bool {
		cfg := &tls.Config{RootCAs: ca.pool(), ServerName: "localhost", VerifyConnection: func(cs tls.ConnectionState) error {
			mu.Lock()
			serials[cs.PeerCertificates[0].SerialNumber.String()] = true
			mu.Unlock()
			return nil
		}}
		cc, err := grpc.NewClient("passthrough:///"+r.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			t.Error(err)
			return false
		}
		_, err = testgrpc.NewTestServiceClient(cc).EmptyCall(ctx, &testgrpc.Empty{})
		cc.Close()
		calls.Add(1)
		if err != nil {
			fails.Add(1)
			firstErr.CompareAndSwap(nil, err.Error())
		}
		return true
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 5000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if !call() {
					return
				}
			}
		}()
	}
	var last string
	for range 6 {
		cert, key := ca.issue(t, "proxy", true)
		block, _ := pem.Decode(cert)
		leaf, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		last = leaf.SerialNumber.String()
		if err := os.WriteFile(st.CertFile, cert, 0o600); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		if err := os.WriteFile(st.KeyFile, key, 0o600); err != nil {
			t.Fatal(err)
		}
		time.Sleep(cluster.ReloadInterval + 200*time.Millisecond)
	}
	close(stop)
	wg.Wait()
	// One more after the last rotation: the clients' 5,000 calls each can
	// end before it on a fast run (an attack run: the last certificate
	// was never shown).
	call()
	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d calls on new connections, %d failed, %d certificates seen", calls.Load(), fails.Load(), len(serials))
	if fails.Load() != 0 {
		t.Errorf("%d of %d calls failed across the rotations; first: %v", fails.Load(), calls.Load(), firstErr.Load())
	}
	if !serials[last] {
		t.Errorf("the last certificate (serial %s) was never served", last)
	}
}
