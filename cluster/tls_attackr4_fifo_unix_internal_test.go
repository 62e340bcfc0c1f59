//go:build unix

package cluster

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestAttackR4ReloadingFIFO: a TLS file (certificate, key, CA) whose path
// turns into a FIFO is logged as unreadable and the value in use stays.
// Before, reloading.get blocked in open(2) waiting for a writer while it
// held its mutex: with a serving certificate swapped for a FIFO, every
// TLS handshake of the proxy hung (openssl s_client timed out), still
// after the certificate was put back, and SIGTERM never ended the process.
func TestAttackR4ReloadingFIFO(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "cert.pem")
	if err := os.WriteFile(file, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := newReloading("value", []string{file}, func(d [][]byte) (string, error) { return string(d[0]), nil }, discardLogger)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	r.now = func() time.Time { return now }
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(file, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // release a reader stuck in open(2)
		if f, err := os.OpenFile(file, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			f.Close()
		}
	})
	now = now.Add(2 * ReloadInterval)
	got := make(chan string, 1)
	go func() { got <- r.get() }()
	select {
	case v := <-got:
		if v != "one" {
			t.Errorf("get() = %q, want the value in use, %q", v, "one")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("get() still blocked on the FIFO after 10 s")
	}
	if _, err := r.read(); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("read() = %v, want an error saying the file is not a regular file", err)
	}
}
