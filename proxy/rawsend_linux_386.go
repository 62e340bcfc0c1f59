//go:build linux && 386

package proxy

import (
	"syscall"
	"unsafe"
)

// rawSendmsg is writev(2) on linux/386, whose socket calls go through
// socketcall(2): flags (MSG_MORE) are dropped, which costs packets, not
// correctness.
func rawSendmsg(fd uintptr, iov []syscall.Iovec, flags int) (uintptr, syscall.Errno) {
	r, _, e := syscall.RawSyscall(syscall.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
	return r, e
}

// rawNodelay does nothing: nothing was kept back (rawSendmsg).
func rawNodelay(fd uintptr) {}
