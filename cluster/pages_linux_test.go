package cluster

import (
	"bufio"
	"fmt"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
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

// openExe opens the test binary.
func openExe(t *testing.T) *os.File {
	t.Helper()
	f, err := os.Open("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// exeCachedPages counts the pages of f in the page cache: mincore(2) on a
// mapping of the whole file, made for the count and touched by nobody,
// reports the page cache's residency whatever the process maps.
func exeCachedPages(t *testing.T, f *os.File) int {
	t.Helper()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	page := os.Getpagesize()
	vec := make([]byte, (len(m)+page-1)/page)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatalf("mincore: %v", errno)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}

// codeVmFlags returns the VmFlags line of the smaps entry that holds this
// package's code.
func codeVmFlags(t *testing.T) string {
	t.Helper()
	pc := uint64(reflect.ValueOf(codeVmFlags).Pointer())
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	in := false
	for s.Scan() {
		line := s.Text()
		if m, ok, err := parseMapsLine([]byte(line)); err == nil && strings.Contains(strings.Fields(line)[0], "-") {
			in = ok && m.start <= pc && pc < m.end
			continue
		}
		if v, ok := strings.CutPrefix(line, "VmFlags:"); ok && in {
			return strings.TrimSpace(v)
		}
	}
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	t.Fatal("no smaps entry holds the code")
	return ""
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
	exe := openExe(t)
	cachedBefore := exeCachedPages(t, exe)
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
	// The executable's page cache: what no process maps left it, but on
	// tmpfs, whose pages are the file itself.
	cachedAfter := exeCachedPages(t, exe)
	t.Logf("executable's pages in the page cache: %d → %d", cachedBefore, cachedAfter)
	var fs unix.Statfs_t
	if err := unix.Fstatfs(int(exe.Fd()), &fs); err != nil {
		t.Fatal(err)
	}
	if magic := uint32(fs.Type); magic == unix.TMPFS_MAGIC || magic == unix.RAMFS_MAGIC {
		t.Logf("the test binary is on tmpfs or ramfs: its pages cannot leave the page cache")
	} else if cachedAfter*4 > cachedBefore*3 {
		// Not all of them leave: a large folio of the page cache stays
		// whole while one of its pages is mapped (about half of this
		// binary's cached pages stayed on ext4, Linux 6.18).
		t.Errorf("%d of the executable's pages are still in the page cache, %d before the release", cachedAfter, cachedBefore)
	}
	// Later faults read one page, not a readahead window: VM_RAND_READ
	// ("rr" in smaps' VmFlags) on the code's mapping.
	if flags := codeVmFlags(t); !strings.Contains(" "+flags+" ", " rr ") {
		t.Errorf("VmFlags of the code's mapping after the release: %q, want rr", flags)
	}
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
