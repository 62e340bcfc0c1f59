package cluster

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/streamlb/streamlb/proxy"
)

// TestAccessLogReopenConcurrent: lines written while the file is reopened
// again and again all land whole, in one file or another.
func TestAccessLogReopenConcurrent(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "access.log")
	al, err := OpenAccessLog(path, "text", io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	const writers, each = 4, 500
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				al.callEnd("c", proxy.CallInfo{Method: "/s/M"}, nil)
			}
		}()
	}
	for i := range 20 {
		if err := os.Rename(path, filepath.Join(dir, fmt.Sprintf("access.log.%d", i))); err != nil {
			t.Fatal(err)
		}
		if err := al.Reopen(); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	if err := al.Close(); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "access.log*"))
	total := 0
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
			if line == "" {
				continue
			}
			if !strings.HasPrefix(line, "time=") || !strings.Contains(line, "msg=call") || !strings.HasSuffix(line, `client=""`) {
				t.Errorf("torn line in %s: %q", name, line)
			}
			total++
		}
	}
	if total != writers*each {
		t.Errorf("%d lines in %d files, want %d", total, len(files), writers*each)
	}
}
