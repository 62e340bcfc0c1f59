//go:build linux

package cluster_test

import (
	"encoding/json"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
)

// TestAccessLogLineCutByFullDisk: a disk that fills in the middle of a
// line takes the line's first bytes (write(2) writes what fits, then
// fails with ENOSPC); the line is lost, as the README says, but the lines
// written once there is room again must still be whole lines of their
// own. The next line was glued to the cut one ({"time":...,"clie{"time":
// ...}), so a log collector dropped it too, or the whole file. A file
// size limit (RLIMIT_FSIZE, EFBIG) stands in for the full disk, as
// mounting a small tmpfs needs privileges.
func TestAccessLogLineCutByFullDisk(t *testing.T) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
		t.Skipf("getrlimit: %v", err)
	}
	signal.Ignore(syscall.SIGXFSZ) // EFBIG instead of the signal's default: exit
	defer signal.Reset(syscall.SIGXFSZ)
	backend := startBackend(t, "b", "127.0.0.1:0")
	path := filepath.Join(t.TempDir(), "access.log")
	al, err := cluster.OpenAccessLog(path, "json", os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer al.Close()
	r := runServer(t, cluster.ServerConfig{AccessLog: al, Cluster: cluster.Config{Name: "b", Targets: []string{backend.Addr()}}})
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 20*time.Second)
	size := func() int64 {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(ctx, t, "the first line", func() bool { return size() > 0 })

	// The "disk" is full 40 bytes into the next line.
	full := lim
	full.Cur = uint64(size() + 40)
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &full); err != nil {
		t.Skipf("setrlimit: %v", err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
				t.Fatal(err)
			}
		}
	}
	defer restore()
	cut := size()
	for range 3 {
		if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
	testkit.WaitFor(ctx, t, "a line cut by the full disk", func() bool { return size() > cut })
	time.Sleep(100 * time.Millisecond) // the other two lines fail
	restore()

	// Room again: these calls' lines must be whole.
	const after = 5
	for range after {
		if _, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	var lines []string
	testkit.WaitFor(ctx, t, "the lines after the disk had room", func() bool {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		lines = strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
		return strings.Count(string(b), "/UnaryCall") >= after
	})
	whole := 0
	for _, l := range lines {
		var rec struct{ Method string }
		if json.Unmarshal([]byte(l), &rec) == nil && strings.HasSuffix(rec.Method, "/UnaryCall") {
			whole++
		}
		if strings.Count(l, `{"time":`) > 1 {
			t.Errorf("a line holds two records: %q", l)
		}
	}
	if whole != after {
		t.Errorf("%d whole lines of the %d calls made once the disk had room, want %d", whole, after, after)
	}
}
