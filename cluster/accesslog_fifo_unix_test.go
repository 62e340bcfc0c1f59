//go:build unix

package cluster

import (
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestAccessLogReopenFIFO: a FIFO nobody reads at the access log's path
// makes a reopen fail at once, keeping the file it had; the open waited
// for a reader, and a SIGHUP then blocked the process's exit (attack round
// 5).
func TestAccessLogReopenFIFO(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "access.log")
	al, err := OpenAccessLog(path, "text", io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	defer al.Close()
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(path, 0o644); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- al.Reopen() }()
	select {
	case err := <-done:
		if err == nil {
			t.Error("Reopen onto a FIFO without a reader succeeded, want an error")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Reopen onto a FIFO without a reader still waiting after 10 s")
	}
	// The file it had still takes lines.
	al.file.Write([]byte("line\n"))
	if b, _ := os.ReadFile(path + ".1"); string(b) != "line\n" {
		t.Errorf("the file kept got %q, want the line", b)
	}
}
