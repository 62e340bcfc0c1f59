//go:build unix

package resolver

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRegistryTLSFilesNotRegular: a registry's CA, certificate or key file
// that is a FIFO is refused at once, naming what it is. Before, the CA
// was read with os.ReadFile, which waits in open(2) for a FIFO's writer
// for ever: `streamlb validate` and a reload that built the cluster hung.
func TestRegistryTLSFilesNotRegular(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.pem")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	t.Cleanup(func() { // release a reader stuck in open(2)
		for range 3 {
			if f, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
				f.Close()
			}
		}
	})
	for _, tc := range []struct{ name, ca, cert, key string }{
		{"ca", fifo, "", ""},
		{"cert", "", fifo, filepath.Join(dir, "none.key")},
		{"key", "", filepath.Join(dir, "none.crt"), fifo},
	} {
		if tc.name == "key" {
			// A real certificate file before the key: the key's read is
			// reached.
			if err := os.WriteFile(tc.cert, []byte("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		done := make(chan error, 1)
		go func() {
			_, err := clientTLS("etcd", tc.ca, tc.cert, tc.key)
			done <- err
		}()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "named pipe") {
				t.Errorf("%s file a FIFO: err %v, want one naming a named pipe", tc.name, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s file a FIFO: clientTLS still blocked after 10s", tc.name)
		}
	}
}
