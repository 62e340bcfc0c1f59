package cluster_test

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestReloadWaitsForFileToSettle rewrites the configuration file in place,
// as an editor or a slow copy does: truncated, then written in two parts
// with a pause between them. The first part alone is a valid file that
// routes only UnaryCall, so EmptyCall would fail with "no route" if the
// poll applied it. The poll must wait for the file to read the same twice:
// no EmptyCall fails, and the whole file is applied in the end.
func TestReloadWaitsForFileToSettle(t *testing.T) {
	if testing.Short() {
		t.Skip("rewrites the file 8 times, about 10s")
	}
	a := startBackend(t, "a", "127.0.0.1:0")
	b := startBackend(t, "b", "127.0.0.1:0")
	path := writeConfig(t, t.TempDir(), fmt.Sprintf("clusters: [{name: x, targets: [%s]}]\nroutes: [{cluster: x}]\n", a.Addr()))
	r := runFile(t, path, false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 60*time.Second)
	if got, err := backendOf(ctx, client); got != "a" {
		t.Fatalf("first call went to %q (%v), want a", got, err)
	}
	first := fmt.Sprintf(`clusters:
  - {name: x, targets: [%s]}
  - {name: y, targets: [%s]}
routes:
  - {match: {method_prefix: /grpc.testing.TestService/UnaryCall}, cluster: y}
`, a.Addr(), b.Addr())
	rest := "  - {cluster: x}\n"

	var calls, failed atomic.Int64
	var lastErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for n := 0; n < 2000; n++ {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			calls.Add(1)
			if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				failed.Add(1)
				lastErr.Store(err.Error())
			}
		}
	}()
	// The first part stays alone 450ms of each 1.15s: a 1s poll that
	// applied what it read would take it at least once in 8 rewrites
	// but for a chance of 0.55^8 (under 1%).
	for i := range 8 {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
		if err != nil {
			t.Fatal(err)
		}
		// Each rewrite its own: two looks that find two rewrites' first
		// parts must not take them for one settled file.
		if _, err := fmt.Fprintf(f, "# rewrite %d\n%s", i, first); err != nil {
			t.Fatal(err)
		}
		time.Sleep(450 * time.Millisecond)
		if _, err := f.WriteString(rest); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(700 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d of %d EmptyCalls failed while the file was rewritten (last: %v): a half-written file was applied", n, calls.Load(), lastErr.Load())
	}
	if calls.Load() < 100 {
		t.Fatalf("only %d calls made", calls.Load())
	}
	testkit.WaitFor(ctx, t, "the whole file to be applied (UnaryCall to b)", func() bool {
		var hdr metadata.MD
		_, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.Header(&hdr))
		return err == nil && testserver.BackendFromHeader(hdr) == "b"
	})
}
