package cluster

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestReloading checks when the files are read again, what a change that
// does not parse does, and that each failure is logged once.
func TestReloading(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	file := filepath.Join(dir, "v")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(file, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	parse := func(data [][]byte) (string, error) {
		if strings.HasPrefix(string(data[0]), "bad") {
			return "", errors.New("bad contents")
		}
		return string(data[0]), nil
	}
	var logs strings.Builder
	write("one")
	r, err := newReloading("value", []string{file}, parse, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	r.now = func() time.Time { return now }
	r.next = now.Add(ReloadInterval)
	steps := []struct {
		name    string
		write   string // "" leaves the file, "-" removes it
		advance time.Duration
		want    string
		errors  int // Error lines logged so far
	}{
		{name: "unchanged", want: "one"},
		{name: "changed, too early", write: "two", advance: ReloadInterval / 2, want: "one"},
		{name: "changed, interval passed", advance: ReloadInterval / 2, want: "two"},
		{name: "bad contents", write: "bad1", advance: ReloadInterval, want: "two", errors: 1},
		{name: "same bad contents, logged once", advance: ReloadInterval, want: "two", errors: 1},
		{name: "removed", write: "-", advance: ReloadInterval, want: "two", errors: 2},
		{name: "still removed, logged once", advance: ReloadInterval, want: "two", errors: 2},
		{name: "back to what is in use", write: "two", advance: ReloadInterval, want: "two", errors: 2},
		{name: "bad again", write: "bad1", advance: ReloadInterval, want: "two", errors: 3},
		{name: "fixed", write: "three", advance: ReloadInterval, want: "three", errors: 3},
	}
	for _, s := range steps {
		switch s.write {
		case "":
		case "-":
			os.Remove(file)
		default:
			write(s.write)
		}
		now = now.Add(s.advance)
		if got := r.get(); got != s.want {
			t.Errorf("%s: get() = %q, want %q", s.name, got, s.want)
		}
		if got := strings.Count(logs.String(), "level=ERROR"); got != s.errors {
			t.Errorf("%s: %d Error lines, want %d:\n%s", s.name, got, s.errors, logs.String())
		}
	}
	if !strings.Contains(logs.String(), `msg="TLS files reloaded"`) {
		t.Errorf("no Info line for the reload:\n%s", logs.String())
	}
}
