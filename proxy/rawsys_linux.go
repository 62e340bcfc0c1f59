//go:build linux

package proxy

import (
	"io"
	"net"
	"os"
	"sync/atomic"
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

// rawReadv is readv(2) into a, then b, as rawRead: one syscall that fills
// the rest of a frame and goes on into the next buffer (fillTo).
func rawReadv(fd uintptr, a, b []byte) (int, error) {
	iov := [2]syscall.Iovec{{Base: &a[0]}, {Base: &b[0]}}
	iov[0].SetLen(len(a))
	iov[1].SetLen(len(b))
	r, _, e := syscall.RawSyscall(syscall.SYS_READV, fd, uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
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
	vfn   func(fd uintptr) bool // writev, bound once
	pfn   func(fd uintptr)      // nodelay, bound once
	p     []byte
	n     int
	errno error
	// iov is writeSegs' vector: iov[vi:] is still to write; flags are
	// its sendmsg flags.
	iov   []syscall.Iovec
	vi    int
	flags int
	// progress, if set, counts the writes that moved bytes (connWriter).
	progress *atomic.Uint32
}

// newRawSock returns a rawSock for a plain TCP or Unix socket, nil for
// anything else (TLS, wrappers that do more in their Write).
func newRawSock(nc net.Conn) *rawSock {
	raw := plainSocket(nc)
	if raw == nil {
		return nil
	}
	s := &rawSock{nc: nc, raw: raw}
	s.fn = s.write
	s.vfn = s.writev
	s.pfn = s.nodelay
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
			if s.progress != nil {
				s.progress.Add(1)
			}
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

// writeSegs writes segs in order with sendmsg(2), waiting in the
// netpoller as Write does. The segments are not changed. With more set
// it passes MSG_MORE: more bytes follow at once, so the kernel keeps a
// last packet smaller than a segment for them instead of sending it on
// its own (see connWriter); push sends it if nothing follows.
func (s *rawSock) writeSegs(segs [][]byte, more bool) error {
	s.flags = 0
	if more {
		s.flags = syscall.MSG_MORE
	}
	for _, p := range segs {
		if len(p) == 0 {
			continue
		}
		v := syscall.Iovec{Base: &p[0]}
		v.SetLen(len(p))
		s.iov = append(s.iov, v)
	}
	s.vi, s.errno = 0, nil
	err := s.raw.Write(s.vfn)
	errno := s.errno
	clear(s.iov) // no pointers into the buffers kept
	s.iov, s.vi, s.errno = s.iov[:0], 0, nil
	if err == nil && errno != nil {
		err = &net.OpError{Op: "writev", Net: s.nc.LocalAddr().Network(), Source: s.nc.LocalAddr(), Addr: s.nc.RemoteAddr(), Err: os.NewSyscallError("writev", errno)}
	}
	return err
}

// writev is RawConn.Write's callback for writeSegs: sendmsg(2) until the
// vector is written, the socket is full (false) or an error.
func (s *rawSock) writev(fd uintptr) bool {
	for s.vi < len(s.iov) {
		iov := s.iov[s.vi:]
		if len(iov) > maxSegs {
			iov = iov[:maxSegs] // within IOV_MAX (1024)
		}
		r, e := rawSendmsg(fd, iov, s.flags)
		switch e {
		case 0:
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		default:
			s.errno = e
			return true
		}
		if s.progress != nil {
			s.progress.Add(1)
		}
		// Skip what was written: whole segments, then into the next.
		n := uint64(r)
		for s.vi < len(s.iov) && n >= uint64(s.iov[s.vi].Len) {
			n -= uint64(s.iov[s.vi].Len)
			s.vi++
		}
		if n > 0 {
			v := &s.iov[s.vi]
			v.Base = (*byte)(unsafe.Add(unsafe.Pointer(v.Base), n))
			v.SetLen(int(uint64(v.Len) - n))
		}
	}
	return true
}

// push makes the kernel send what MSG_MORE kept back: setting
// TCP_NODELAY (which the runtime set on the socket already) pushes the
// pending packets (tcp(7)). Not a TCP socket: nothing was kept back.
func (s *rawSock) push() { s.raw.Control(s.pfn) }

// nodelay is push's callback.
func (s *rawSock) nodelay(fd uintptr) { rawNodelay(fd) }

// WrapSocket returns a plain TCP connection wrapped so that its Read and
// Write use rawRead and rawSock (see above); any other net.Conn is
// returned as it is. The data plane reads and writes plain sockets this
// way itself; WrapSocket is for a layer between them, such as TLS
// (tls.Server(proxy.WrapSocket(nc), cfg)), whose record reads and writes
// would otherwise each wake sysmon. Read and Write may be called
// concurrently with each other, not with themselves, which is how
// crypto/tls uses its connection.
func WrapSocket(nc net.Conn) net.Conn {
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return nc
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return nc
	}
	w := newRawSock(nc)
	if w == nil {
		return nc
	}
	c := &rawTCPConn{TCPConn: tc, raw: raw, w: w}
	c.rfn = c.read
	return c
}

// rawTCPConn is WrapSocket's connection.
type rawTCPConn struct {
	*net.TCPConn
	raw  syscall.RawConn
	w    *rawSock
	rfn  func(fd uintptr) bool // read, bound once
	rp   []byte
	rn   int
	rerr error
}

func (c *rawTCPConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rp = p
	err := c.raw.Read(c.rfn)
	n, rerr := c.rn, c.rerr
	c.rp, c.rn, c.rerr = nil, 0, nil
	switch {
	case err != nil: // closed, deadline
		return 0, err
	case rerr != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.NewSyscallError("read", rerr)}
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// read is RawConn.Read's callback.
func (c *rawTCPConn) read(fd uintptr) bool {
	for {
		n, err := rawRead(fd, c.rp)
		switch err {
		case nil:
			c.rn = n
			return true
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			c.rerr = err
			return true
		}
	}
}

func (c *rawTCPConn) Write(p []byte) (int, error) { return c.w.Write(p) }
