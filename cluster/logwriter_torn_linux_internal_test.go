//go:build linux

package cluster

import (
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestLogWriterLineCutByFullDisk: the process log (and --access-log -)
// going to a file on a disk that fills in the middle of a line: the cut
// line is lost, but the next line written once there is room is a whole
// line of its own. It was glued to the cut one. A file size limit
// (RLIMIT_FSIZE, EFBIG) stands in for the full disk.
func TestLogWriterLineCutByFullDisk(t *testing.T) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
		t.Skipf("getrlimit: %v", err)
	}
	signal.Ignore(syscall.SIGXFSZ)
	defer signal.Reset(syscall.SIGXFSZ)
	path := filepath.Join(t.TempDir(), "stderr.log")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lw := NewLogWriter(f, 0, nil)
	size := func() int64 {
		st, err := f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	waitSize := func(want int64) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); size() != want; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("file size %d, want %d", size(), want)
			}
		}
	}
	lw.Write(line(1))
	waitSize(100)
	full := lim
	full.Cur = 140 // the disk fills 40 bytes into line 2
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &full); err != nil {
		t.Skipf("setrlimit: %v", err)
	}
	lw.Write(line(2))
	waitSize(140)
	time.Sleep(10 * time.Millisecond) // the write has returned
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
		t.Fatal(err)
	}
	lw.Write(line(3))
	lw.Close()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	if len(lines) != 4 || lines[0]+"\n" != string(line(1)) || lines[2]+"\n" != string(line(3)) || lines[3] != "" {
		t.Errorf("file holds %q, want line 1, the first 40 bytes of line 2, and line 3 on a line of its own", b)
	}
}
