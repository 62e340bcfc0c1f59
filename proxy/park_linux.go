//go:build linux

package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// parkSupported: Linux parks idle client connections in an epoll set.
const parkSupported = true

// socketRawConn returns the RawConn of a plain TCP socket, or of
// WrapSocket's wrapper of one; nil for any other connection.
func socketRawConn(nc net.Conn) syscall.RawConn {
	switch v := nc.(type) {
	case *net.TCPConn:
		if rc, err := v.SyscallConn(); err == nil {
			return rc
		}
	case *rawTCPConn:
		return v.raw
	}
	return nil
}

// parker is a server's set of parked client connections (park.go): one
// epoll instance, and one goroutine, waitLoop, blocked in epoll_wait while
// any connection is parked or was since the server last had none. Sockets
// are registered level-triggered with EPOLLONESHOT, so bytes that arrived
// between the reader's last read and the registration fire at once, and
// each registration fires once. The epoll data is a key into conns, never
// the descriptor: a descriptor number is reused once its socket closes.
type parker struct {
	srv *Server

	mu sync.Mutex
	// mu guards the fields below.
	conns map[uint64]*serverConn // parked connections by parkCtl.id
	next  uint64                 // the last id given; 0 is the wake-up eventfd
	epfd  int                    // -1 while no waitLoop runs
	evfd  int                    // eventfd that stops waitLoop
	// parks counts the parks since the last GC for their stacks, at
	// lastGC (Server.collectParkedStacks); parksSeen is parks at the
	// housekeeper's previous look.
	parks     int
	parksSeen int
	quiet     int // looks in a row that saw no new park
	lastGC    time.Time
}

func (p *parker) init(s *Server) {
	p.srv = s
	p.epfd, p.evfd = -1, -1
}

// Epoll events a parked socket waits for: bytes, or the client's FIN.
const parkEvents = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT

// park registers c's socket and makes c parked. On success the caller's
// goroutine, c's reader, must return without touching c: the parker or a
// closer starts the next reader. It fails (errClosed) when c is closing.
func (p *parker) park(c *serverConn) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.pk.closing {
		return errClosed
	}
	if p.epfd < 0 {
		if err := p.startLocked(); err != nil {
			return err
		}
	}
	p.next++
	id := p.next
	ev := unix.EpollEvent{Events: parkEvents}
	setEventID(&ev, id)
	var cerr error
	err := c.pk.rc.Control(func(fd uintptr) {
		cerr = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
		if errors.Is(cerr, unix.EEXIST) {
			// Registered by an earlier park whose removal failed: re-arm.
			cerr = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_MOD, int(fd), &ev)
		}
	})
	if err != nil {
		return errClosed // the socket is closed
	}
	if cerr != nil {
		return fmt.Errorf("proxy: epoll_ctl: %w", cerr)
	}
	c.pk.id = id
	p.conns[id] = c
	p.parks++
	c.pk.state.Store(pkParked)
	return nil
}

// gcDue reports whether a GC for the stacks of parked readers is due
// (see collectParkedStacks), and if so counts it as done.
func (p *parker) gcDue(now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.parks != p.parksSeen { // still parking: wait for the end
		p.parksSeen, p.quiet = p.parks, 0
		return false
	}
	p.quiet++
	if p.quiet < 2 || p.parks < parkGCAfter || now.Sub(p.lastGC) < parkGCEvery {
		return false
	}
	p.parks, p.parksSeen, p.quiet, p.lastGC = 0, 0, 0, now
	return true
}

// forget removes c's socket from the epoll set. The resumed reader calls
// it; on a closed socket it does nothing (closing removed it).
func (p *parker) forget(c *serverConn) {
	p.mu.Lock()
	epfd := p.epfd
	p.mu.Unlock()
	if epfd < 0 {
		return
	}
	// Control holds the descriptor open while it runs, so it cannot be
	// another socket's by then.
	c.pk.rc.Control(func(fd uintptr) {
		unix.EpollCtl(epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
	})
}

// closing marks c as closing, so it never parks again, and resumes its
// reader if it is parked, so that the connection's end runs.
func (p *parker) closing(c *serverConn) {
	p.mu.Lock()
	c.pk.closing = true
	parked := p.takeLocked(c.pk.id) == c
	p.mu.Unlock()
	if parked {
		go c.resume()
	}
}

// takeLocked removes the connection parked as id and returns it, nil if
// none is. Caller must hold mu.
func (p *parker) takeLocked(id uint64) *serverConn {
	c := p.conns[id]
	if c != nil {
		delete(p.conns, id)
		c.pk.id = 0
	}
	return c
}

// startLocked makes the epoll set and starts waitLoop. The goroutine is
// counted in the server's connWG, which the parking connection holds
// above zero. Caller must hold mu.
func (p *parker) startLocked() error {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return fmt.Errorf("proxy: epoll_create1: %w", err)
	}
	evfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return fmt.Errorf("proxy: eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN} // id 0
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, evfd, &ev); err != nil {
		unix.Close(evfd)
		unix.Close(epfd)
		return fmt.Errorf("proxy: epoll_ctl: %w", err)
	}
	if p.conns == nil {
		p.conns = make(map[uint64]*serverConn)
	}
	p.epfd, p.evfd = epfd, evfd
	p.srv.connWG.Add(1)
	go func() {
		defer p.srv.connWG.Done()
		p.waitLoop(epfd, evfd)
	}()
	return nil
}

// stop ends waitLoop, if one runs. The server calls it when its last
// connection ended, so nothing is parked. A later park starts a new one.
func (p *parker) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.epfd < 0 {
		return
	}
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	unix.Write(p.evfd, one[:])
	p.epfd, p.evfd = -1, -1 // waitLoop closes them
}

// waitLoop waits for parked sockets to become readable and starts a
// reader for each, until stop writes to evfd. Then it closes both.
func (p *parker) waitLoop(epfd, evfd int) {
	defer unix.Close(epfd)
	defer unix.Close(evfd)
	events := make([]unix.EpollEvent, 64)
	var woken []*serverConn
	for {
		n, err := unix.EpollWait(epfd, events, -1)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			// Not expected with a valid epoll descriptor. Resume
			// everything parked so nothing hangs; the next park makes
			// a new epoll set.
			p.srv.log.Error("idle connection parker failed; resuming the parked connections", "err", err)
			p.mu.Lock()
			for id := range p.conns {
				woken = append(woken, p.takeLocked(id))
			}
			if p.epfd == epfd {
				p.epfd, p.evfd = -1, -1
			}
			p.mu.Unlock()
			for _, c := range woken {
				go c.resume()
			}
			return
		}
		stopped := false
		p.mu.Lock()
		for i := range events[:n] {
			id := eventID(&events[i])
			if id == 0 {
				stopped = true
				continue
			}
			if c := p.takeLocked(id); c != nil {
				woken = append(woken, c)
			}
		}
		p.mu.Unlock()
		for i, c := range woken {
			go c.resume()
			woken[i] = nil
		}
		woken = woken[:0]
		if stopped {
			return
		}
	}
}

// setEventID and eventID keep a 64-bit key in an epoll event's data,
// which x/sys/unix spells as the Fd and Pad fields.
func setEventID(ev *unix.EpollEvent, id uint64) {
	ev.Fd = int32(uint32(id))
	ev.Pad = int32(uint32(id >> 32))
}

func eventID(ev *unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

// parked reports how many connections are parked, for tests.
func (p *parker) parked() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}
