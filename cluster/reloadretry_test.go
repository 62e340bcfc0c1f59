package cluster_test

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestReloadRetriesRefusedFile: a new configuration file names a CA file
// that is not there yet (as when a Kubernetes ConfigMap is updated before
// the Secret it names), so its reload is refused and the running
// configuration stays; once the CA file appears, with the configuration
// file untouched, the poll's retry applies it. Before, a refused file was
// taken as seen and not tried again until it changed or a SIGHUP came.
func TestReloadRetriesRefusedFile(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for a retry, about 13s")
	}
	a := startBackend(t, "a", "127.0.0.1:0")
	b := startBackend(t, "b", "127.0.0.1:0")
	dir := t.TempDir()
	path := writeConfig(t, dir, fmt.Sprintf("clusters: [{name: x, targets: [%s]}]\nroutes: [{cluster: x}]\n", a.Addr()))
	r := runFile(t, path, false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 40*time.Second)
	if got, err := backendOf(ctx, client); got != "a" {
		t.Fatalf("first call went to %q (%v), want a", got, err)
	}
	caPath := filepath.Join(dir, "ca.pem")
	writeConfig(t, dir, fmt.Sprintf(`clusters:
  - {name: x, targets: [%s]}
  - {name: z, targets: [%s], backend_tls: {ca: %s}}
routes: [{cluster: x}]
`, b.Addr(), a.Addr(), caPath))
	// Two looks a second apart, then the refusal: the calls stay on a.
	time.Sleep(3 * time.Second)
	for range 5 {
		if got, err := backendOf(ctx, client); got != "a" {
			t.Fatalf("a call while the new file is refused went to %q (%v), want a", got, err)
		}
	}
	writeFile(t, dir, "ca.pem", newCA(t, "later").pem)
	testkit.WaitFor(ctx, t, "the refused file to be applied once its CA file exists", func() bool {
		got, _ := backendOf(ctx, client)
		return got == "b"
	})
}
