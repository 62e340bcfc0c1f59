package resolver

import (
	"bytes"
	"os"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestH1RegistryClientCertReloaded: the client certificate of a registry
// client is read again once its files change, and a change that does not
// load (the certificate rewritten, the key not yet) leaves the one in
// use.
func TestH1RegistryClientCertReloaded(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ca := testkit.NewCA(t, "ca")
	certFile, keyFile := ca.WriteIssued(t, dir, "client", false)
	cfg, err := clientTLS("etcd", "", certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	leaf := func() []byte {
		t.Helper()
		c, err := cfg.GetClientCertificate(nil)
		if err != nil || c == nil {
			t.Fatalf("GetClientCertificate: %v, %v", c, err)
		}
		return c.Certificate[0]
	}
	first := leaf()
	c2, k2 := ca.Issue(t, "client-2", false)
	if err := os.WriteFile(certFile, c2, 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(clientCertReload + 50*time.Millisecond)
	if !bytes.Equal(leaf(), first) {
		t.Error("a new certificate with the old key was taken; want the pair in use kept")
	}
	if err := os.WriteFile(keyFile, k2, 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(clientCertReload + 50*time.Millisecond)
	if bytes.Equal(leaf(), first) {
		t.Error("the rotated pair was not taken")
	}
}
