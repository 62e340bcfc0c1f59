//go:build unix

package cluster_test

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/streamlb/streamlb/cluster"
)

// TestAttackR4LoadFileNotRegular: a configuration path that is a FIFO, a
// directory or a file too large to be a configuration is refused at once
// with an error that says why. Before, LoadFile (streamlb validate, proxy
// start, and each reload's read) blocked forever in open(2) on a FIFO with
// no writer, and read any size, /dev/zero until memory ran out (validate
// under a 1.5 GB address-space limit died "out of memory").
func TestAttackR4LoadFileNotRegular(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.yaml")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // release a reader stuck in open(2)
		if f, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			f.Close()
		}
	})
	big := filepath.Join(dir, "big.yaml")
	if err := os.WriteFile(big, []byte("listen: :8080\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(big, 16<<20+1); err != nil { // sparse, over the 16 MiB bound
		t.Fatal(err)
	}
	for _, c := range []struct{ name, path, want string }{
		{"fifo", fifo, "not a regular file"},
		{"directory", dir, "directory"},
		{"too large", big, "over the"},
	} {
		t.Run(c.name, func(t *testing.T) {
			errc := make(chan error, 1)
			go func() { _, err := cluster.LoadFile(c.path); errc <- err }()
			select {
			case err := <-errc:
				if err == nil || !strings.Contains(err.Error(), c.want) {
					t.Errorf("LoadFile(%s) = %v, want an error containing %q", c.name, err, c.want)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("LoadFile(%s) still blocked after 10 s", c.name)
			}
		})
	}
}
