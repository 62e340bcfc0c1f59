//go:build linux

package proxy

import (
	"net"
	"os"
	"syscall"
	"unsafe"
)

// The data plane's read(2) and write(2) on plain sockets are made with
// syscall.RawSyscall instead of syscall.Syscall. The sockets are
// non-blocking (the runtime's netpoller waits for them), so these calls
// never block, and RawSyscall skips the runtime's entersyscall/exitsyscall.
// That matters at moderate load: entersyscall wakes sysmon whenever it is
// in its deep sleep (the process was idle), and sysmon then polls every
// 20 µs until the process is idle again, each poll a context switch on the
// proxy's CPU. At a few thousand calls per second the proxy goes idle
// between calls, so every call paid for those wake-ups (issue 12: the CPU
// per call at a fixed 2,000 calls/s).

// rawRead is read(2) on a non-blocking descriptor without entering the
// scheduler's syscall state.
func rawRead(fd uintptr, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

// rawSock writes a plain socket's descriptor through syscall.RawConn with
// rawWrite, waiting in the netpoller (and honouring write deadlines and
// Close) when the socket's buffer is full. It is used by one writer
// goroutine at a time.
type rawSock struct {
	nc    net.Conn
	raw   syscall.RawConn
	fn    func(fd uintptr) bool // write, bound once so a Write allocates nothing
	p     []byte
	n     int
	errno error
}

// newRawSock returns a rawSock for a plain TCP or Unix socket, nil for
// anything else (TLS, wrappers that do more in their Write).
func newRawSock(nc net.Conn) *rawSock {
	var sc syscall.Conn
	switch v := nc.(type) {
	case *net.TCPConn:
		sc = v
	case *net.UnixConn:
		sc = v
	default:
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	s := &rawSock{nc: nc, raw: raw}
	s.fn = s.write
	return s
}

// Write implements io.Writer.
func (s *rawSock) Write(p []byte) (int, error) {
	s.p, s.n, s.errno = p, 0, nil
	err := s.raw.Write(s.fn)
	n, errno := s.n, s.errno
	s.p, s.n, s.errno = nil, 0, nil
	if err == nil && errno != nil {
		err = &net.OpError{Op: "write", Net: s.nc.LocalAddr().Network(), Source: s.nc.LocalAddr(), Addr: s.nc.RemoteAddr(), Err: os.NewSyscallError("write", errno)}
	}
	return n, err
}

// write is RawConn.Write's callback: write(2) until p is written, the
// socket is full (false: wait until writable, then called again) or an
// error.
func (s *rawSock) write(fd uintptr) bool {
	for s.n < len(s.p) {
		r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&s.p[s.n])), uintptr(len(s.p)-s.n))
		switch e {
		case 0:
			s.n += int(r)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			s.errno = e
			return true
		}
	}
	return true
}
