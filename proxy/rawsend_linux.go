//go:build linux && !386

package proxy

import (
	"syscall"
	"unsafe"
)

// rawSendmsg is sendmsg(2) of iov with flags on a non-blocking socket,
// without entering the scheduler's syscall state (rawsys_linux.go).
func rawSendmsg(fd uintptr, iov []syscall.Iovec, flags int) (uintptr, syscall.Errno) {
	msg := syscall.Msghdr{Iov: &iov[0]}
	setLen(&msg.Iovlen, len(iov))
	r, _, e := syscall.RawSyscall(syscall.SYS_SENDMSG, fd, uintptr(unsafe.Pointer(&msg)), uintptr(flags))
	return r, e
}

// setLen sets a length field of a kernel structure, whose type is the
// platform's.
func setLen[T ~uint32 | ~uint64](p *T, n int) { *p = T(n) }

// rawNodelay sets TCP_NODELAY, which pushes what MSG_MORE kept back
// (tcp(7)); on a socket that is not TCP it fails, and nothing was kept.
func rawNodelay(fd uintptr) {
	one := int32(1)
	syscall.RawSyscall6(syscall.SYS_SETSOCKOPT, fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, uintptr(unsafe.Pointer(&one)), 4, 0)
}
