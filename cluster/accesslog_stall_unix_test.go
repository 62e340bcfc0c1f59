//go:build unix

package cluster_test

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/internal/testkit"
)

// stalledLog opens an access log on a FIFO whose reader never reads, and
// fills the FIFO's buffer: every further write blocks, as a write to a
// stuck log collector's pipe or a hung NFS mount does.
func stalledLog(t *testing.T) *cluster.AccessLog {
	t.Helper()
	path := filepath.Join(t.TempDir(), "access.log")
	if err := syscall.Mkfifo(path, 0o644); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	// The reader that never reads (opened first: the log opens the
	// FIFO without waiting for one).
	rd, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rd.Close() })
	al, err := cluster.OpenAccessLog(path, "text", os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { al.Close() })
	// Fill the pipe.
	fill, err := syscall.Open(path, syscall.O_WRONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fill)
	buf := make([]byte, 4096)
	for range 1 << 12 {
		if _, err := syscall.Write(fill, buf); err != nil {
			return al
		}
	}
	t.Fatal("the FIFO took 16 MiB without a reader")
	return nil
}

// TestAccessLogStalledDoesNotHoldCalls: an access log whose writes block
// (a FIFO nobody reads, a hung disk) holds up no call, with either engine:
// the README's "a slow disk does not slow calls down". The grpc-proxy
// engine wrote the line on the call's own goroutine before grpc-go sent
// the status, so every call hung at its end for as long as the log did.
// Nor does it hold a reopen (SIGHUP), or the shutdown for longer than
// the bound on delivering the last lines (2 s): the frame engine's Run
// waited for the blocked write for ever, so SIGTERM never ended the
// process, and the log's Close and a reopen waited for the write's lock.
func TestAccessLogStalledDoesNotHoldCalls(t *testing.T) {
	backend := startBackend(t, "b", "127.0.0.1:0")
	for _, engine := range cluster.Engines() {
		t.Run(engine, func(t *testing.T) {
			al := stalledLog(t)
			r := runServer(t, cluster.ServerConfig{Engine: engine, AccessLog: al,
				Cluster: cluster.Config{Targets: []string{backend.Addr()}}})
			client := dial(t, r.addr)
			for i := range 3 {
				ctx := testkit.Context(t, 5*time.Second)
				if _, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{}); err != nil {
					t.Fatalf("call %d with the access log stalled: %v", i, err)
				}
			}
			// A SIGHUP's reopen does not wait behind the blocked write.
			reopened := make(chan error, 1)
			go func() { reopened <- al.Reopen() }()
			select {
			case err := <-reopened:
				if err != nil {
					t.Errorf("Reopen: %v", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Reopen still waiting after 5 s behind a blocked write")
			}
			// And the shutdown (runServer's cleanup) returns within its
			// bound, then Close (stalledLog's) wakes the blocked write.
		})
	}
}
