package cluster

import (
	"fmt"
	"os"
	"reflect"
	"syscall"

	"golang.org/x/sys/unix"
)

// ReleaseStartupPages drops the process's mappings of its executable's
// code and read-only data (see pages.go), so the pages that only start-up
// used leave its RSS; marks them for random access; and drops the
// executable's pages that no process maps any more from the page cache,
// so that what the program touches again is mapped a page at a time. It
// returns how many bytes of mappings it dropped (resident or not). It is
// safe to call at any time and from any goroutine, but it is meant to be
// called once, when start-up is over: the
// proxy command has [Server.Run] call it, with
// [ServerConfig.ReleaseStartupPages], before it accepts clients.
func ReleaseStartupPages() (int64, error) {
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return 0, fmt.Errorf("cluster: release start-up pages: %w", err)
	}
	defer f.Close()
	// This function's own code is in the executable's text mapping.
	pc := uint64(reflect.ValueOf(ReleaseStartupPages).Pointer())
	maps, err := exeMappings(f, pc)
	if err != nil {
		return 0, fmt.Errorf("cluster: release start-up pages: %w", err)
	}
	var n int64
	for _, m := range maps {
		// MADV_DONTNEED on a private file mapping that was never written
		// drops its page-table entries; the next access maps the page
		// cache's page again (madvise(2)).
		if _, _, errno := syscall.Syscall(syscall.SYS_MADVISE, uintptr(m.start), uintptr(m.end-m.start), syscall.MADV_DONTNEED); errno != 0 {
			return n, fmt.Errorf("cluster: release start-up pages: madvise %#x-%#x: %w", m.start, m.end, errno)
		}
		n += int64(m.end - m.start)
		// MADV_RANDOM: a later fault reads the page it needs from the
		// file, not a readahead window around it (filemap_fault skips
		// readahead for VM_RAND_READ), which would put the neighbours
		// back in the page cache for fault-around to map.
		if _, _, errno := syscall.Syscall(syscall.SYS_MADVISE, uintptr(m.start), uintptr(m.end-m.start), syscall.MADV_RANDOM); errno != 0 {
			return n, fmt.Errorf("cluster: release start-up pages: madvise random %#x-%#x: %w", m.start, m.end, errno)
		}
	}
	if err := dropExeCache(); err != nil {
		return n, fmt.Errorf("cluster: release start-up pages: %w", err)
	}
	return n, nil
}

// dropExeCache drops the executable's clean pages that no process maps
// from the page cache (posix_fadvise(POSIX_FADV_DONTNEED)). Fault-around
// maps only pages the page cache holds, so once start-up's pages have
// left it, a fault maps the page touched and the few neighbours that
// running code already brought in, not 64 KiB of start-up's pages; the
// kernel would drop those clean pages under memory pressure anyway. A
// dirty page (a binary written moments ago, as by go build) is skipped
// by the advice, so the file is written back first; for a clean file,
// or a read-only file system, that costs nothing or fails harmlessly.
func dropExeCache() error {
	f, err := os.Open("/proc/self/exe")
	if err != nil {
		return err
	}
	defer f.Close()
	raw, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var adviseErr error
	if err := raw.Control(func(fd uintptr) {
		_ = unix.Fdatasync(int(fd))
		adviseErr = unix.Fadvise(int(fd), 0, 0, unix.FADV_DONTNEED)
	}); err != nil {
		return err
	}
	if adviseErr != nil {
		return fmt.Errorf("fadvise %s: %w", f.Name(), adviseErr)
	}
	return nil
}
