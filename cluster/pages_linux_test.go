package cluster

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

// rssFileKiB reads the process's file-backed RSS.
func rssFileKiB(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "RssFile:"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("RssFile %q: %v", v, err)
			}
			return n
		}
	}
	t.Fatal("no RssFile in /proc/self/status")
	return 0
}

// pagesCanary is written before the release and read after it: a release
// that dropped the writable data mapping would read its value from the
// file (zero, as .bss) again.
var pagesCanary = map[string]int{}

// TestReleaseStartupPages releases this test binary's pages and checks
// that its file-backed RSS fell, that its data survived and that its code
// still runs.
func TestReleaseStartupPages(t *testing.T) {
	// Not parallel: the other tests' goroutines would map pages back
	// while RSS is read.
	pagesCanary["x"] = 42
	before := rssFileKiB(t)
	n, err := ReleaseStartupPages()
	if err != nil {
		t.Fatalf("ReleaseStartupPages: %v", err)
	}
	after := rssFileKiB(t)
	if n <= 0 {
		t.Fatalf("ReleaseStartupPages dropped %d bytes of mappings", n)
	}
	// The test binary's code is tens of MiB; what this goroutine touches
	// between the two readings is far less.
	if after >= before {
		t.Errorf("RssFile %d KiB after the release, %d before", after, before)
	}
	t.Logf("dropped %d MiB of mappings; RssFile %d → %d KiB", n>>20, before, after)
	if got := pagesCanary["x"]; got != 42 {
		t.Errorf("data written before the release reads %d, want 42", got)
	}
	// Code that start-up ran and code that it did not both run again.
	if got := fmt.Sprintf("%d %s %v", 7, strconv.Quote("q"), 1.5); got != `7 "q" 1.5` {
		t.Errorf("Sprintf after the release: %q", got)
	}
	if _, err := exeMappings(strings.NewReader(testMaps), 0x400000); err != nil {
		t.Errorf("exeMappings after the release: %v", err)
	}
	// A second release is harmless.
	if _, err := ReleaseStartupPages(); err != nil {
		t.Errorf("second ReleaseStartupPages: %v", err)
	}
}
