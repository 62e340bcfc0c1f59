package cluster

import (
	"fmt"
	"os"
	"reflect"
	"syscall"
)

// ReleaseStartupPages drops the process's mappings of its executable's
// code and read-only data (see pages.go), so the pages that only start-up
// used leave its RSS; the pages the program touches again are mapped
// again from the page cache. It returns how many bytes of mappings it
// dropped (resident or not). It is safe to call at any time and from any
// goroutine, but it is meant to be called once, when start-up is over: the
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
	}
	return n, nil
}
