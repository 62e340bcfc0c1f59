package proxy

import (
	"crypto/tls"
	"errors"
	"net"
	"os"
	"runtime/debug"
	"sync/atomic"
	"syscall"
	"time"
)

// Idle client connections without a goroutine (issues 9 and 12: what an
// idle connection costs). A client connection that has had no stream, no
// frame read and nothing to write for a while gives up its reader
// goroutine, as nginx and HAProxy hold idle connections in their event
// loop: its socket goes into the server's parker (an epoll set on Linux,
// park_linux.go), and when the socket becomes readable, or the client
// hangs up, the parker starts a new reader, which goes on with the same
// frame loop state. Everything else of the connection (streams table,
// HPACK tables, flow-control windows, the on-demand writer) stays as it
// is: only the goroutine and its stack go.
//
// The steps, none of them on the path of a busy connection:
//
//   - The server's housekeeper (Server.housekeep) asks: when the
//     connection has no stream, nothing queued, no writer running, and it
//     did not ask within Config.ParkAfter, it sets pkAsked and moves the
//     read deadline into the past, which wakes the reader out of its read
//     with a timeout. That is a runtime timer, not a syscall.
//   - The reader (contGuard, below the Framer, where no byte of a frame
//     can be lost) takes the timeout: if the frame loop is between two
//     frames, outside a header block, and read no frame since the previous
//     ask (so the connection was quiet for at least ParkAfter), the read
//     fails with errParkAsked and the frame loop returns it; otherwise the
//     deadline is cleared and the read goes on.
//   - serverConn.run checks once more under mu that the connection is
//     idle, registers the socket with the parker (one epoll_ctl) and its
//     goroutine returns. A connection that has carried a stream since
//     does not park.
//   - The parker, or whoever closes the connection (Server.Close, the idle
//     timeout's drain, a failed write), resumes it: a new goroutine removes
//     the socket from the epoll set (one epoll_ctl), clears the deadline
//     and runs the frame loop again; a closed socket makes it end the
//     connection as a reader always did.
//
// TLS: a connection is parked only on a read timeout from tls.Conn.Read,
// which happens only when crypto/tls holds no decrypted bytes and no whole
// record (Read returns buffered plaintext without touching the socket, and
// reads the socket only for a record it does not hold in full): whatever
// it holds is the start of a record whose rest must come through the
// socket, so the socket's readiness is the connection's. Other wrapped
// connections (net.Conn wrappers that may buffer) are never parked.

// Park states of a client connection (parkCtl.state).
const (
	pkRunning int32 = iota // a reader goroutine runs the frame loop
	pkAsked                // the housekeeper asked the reader to park
	pkParked               // no reader goroutine: the socket is in the parker
)

// errParkAsked is what the reader's read returns when it may park: the
// frame loop is between frames, the housekeeper asked, and the connection
// read nothing since the previous ask.
var errParkAsked = errors.New("proxy: reader asked to park")

// errNoParking is the parker's answer where it cannot park.
var errNoParking = errors.New("proxy: parking not supported")

// aLongTimeAgo is a read deadline in the past: a read returns at once
// with a timeout (as net/http's aLongTimeAgo).
var aLongTimeAgo = time.Unix(1, 0)

// parkCtl is a client connection's part in parking.
type parkCtl struct {
	// rc is the socket's, for the parker; nil when the connection is not
	// one that can park (not TCP, a wrapper, or no parker on this OS).
	rc    syscall.RawConn
	state atomic.Int32 // pkRunning, pkAsked, pkParked
	// askFrames is contGuard.frames at the previous ask. Reader only.
	askFrames uint64
	// askAt is when the housekeeper may ask next; guarded by the
	// transport's mu.
	askAt time.Time
	// id is the connection's key in the parker while parked, and closing
	// is set once it is closed; both guarded by the parker's mu.
	id      uint64
	closing bool
}

// parkRawConn returns the RawConn of nc's TCP socket if nc is a
// connection whose reader may park: a *net.TCPConn (or WrapSocket's
// wrapper of one, which reads it without a buffer), or TLS over one (see
// the file comment), nil otherwise.
func parkRawConn(nc net.Conn) syscall.RawConn {
	if !parkSupported {
		return nil
	}
	if t, ok := nc.(interface {
		NetConn() net.Conn
		ConnectionState() tls.ConnectionState
	}); ok {
		nc = t.NetConn()
	}
	return socketRawConn(nc)
}

// parkTimeout runs in contGuard.Read when a read failed without bytes and
// the connection can park: it decides what the timeout of an ask means.
// It returns errParkAsked if the reader may park now, the read's result
// after clearing the deadline if not, and err unchanged if err is not the
// timeout of an ask. Reader only.
func (g *contGuard) parkTimeout(p []byte, err error) (int, error) {
	pk := g.pk
	for {
		if pk.state.Load() != pkAsked || !errors.Is(err, os.ErrDeadlineExceeded) {
			return 0, err
		}
		between := g.nhdr == 0 && g.payload == 0 && !g.inBlock
		if between && g.frames == pk.askFrames {
			return 0, errParkAsked
		}
		// Mid-frame, or frames came since the previous ask: not idle.
		pk.askFrames = g.frames
		g.nc.SetReadDeadline(time.Time{})
		pk.state.Store(pkRunning)
		var n int
		if n, err = g.r.Read(p); n > 0 || err == nil {
			return n, err
		}
	}
}

// askPark runs on the server's housekeeper: it asks the reader of a
// connection that is idle now to park (see the file comment).
func (c *serverConn) askPark(now time.Time, after time.Duration) {
	pk := &c.pk
	if pk.rc == nil || after <= 0 || pk.state.Load() != pkRunning || c.wstate.Load() != wIdle {
		return
	}
	c.mu.Lock()
	idle := !c.closed && c.handshook && !c.goingAway && c.drainPhase == drainNone &&
		len(c.streams) == 0 && len(c.ctrl) == 0 && !now.Before(pk.askAt)
	if idle {
		// A quarter of slack, so that the ticker's jitter does not skip
		// a pass and make asks come every other pass.
		pk.askAt = now.Add(after - after/4)
	}
	c.mu.Unlock()
	if idle && pk.state.CompareAndSwap(pkRunning, pkAsked) {
		c.nc.SetReadDeadline(aLongTimeAgo)
	}
}

// parkFramerBuf is the largest read buffer of the Framer a connection keeps
// when it parks.
const parkFramerBuf = 1 << 10

// tryPark runs on the reader after the frame loop returned errParkAsked:
// it parks the connection if it is still idle and reports whether it did;
// if so the caller's goroutine must return without touching the
// connection. Otherwise the reader goes on.
func (c *serverConn) tryPark() bool {
	c.mu.Lock()
	// Not with a header block open (hd.open, reader only): the Framer
	// expects its CONTINUATION, and a new Framer would not.
	idle := !c.closed && !c.goingAway && c.drainPhase == drainNone && len(c.streams) == 0 && !c.hd.open
	if idle {
		// What the connection's calls left behind goes with the reader:
		// the empty stream map (onHeaders makes one at the next stream),
		// the decoder's scratch, and a Framer whose buffer of the
		// largest frame it read is over parkFramerBuf, up to 16 KiB
		// after an upload (reader only; the next block, or frame, makes
		// them again; a new Framer costs about as much as a small
		// buffer), and the socket reader's small buffer (TLS: 512
		// bytes). The HPACK tables stay: they are the protocol's state;
		// so does the header block copy (ownBlock), a few hundred bytes
		// the decoder keeps a slice of anyway.
		c.streams = nil
		c.hd.fields = nil
		c.hd.block = headerBlock{} // its Fields are the same array
		if c.cg.largest > parkFramerBuf {
			c.newReadFramer()
		}
		c.cr.parked()
	}
	c.mu.Unlock()
	if idle {
		if err := c.srv.parker.park(c); err == nil {
			return true
		} else if !errors.Is(err, errClosed) {
			c.log.Debug("cannot park idle client connection", "remote", c.remote.String(), "err", err)
		}
	}
	c.nc.SetReadDeadline(time.Time{})
	c.pk.state.Store(pkRunning)
	return false
}

// resume runs on the goroutine the parker, or a closer, started for a
// parked connection: it becomes the connection's reader.
func (c *serverConn) resume() {
	c.srv.parker.forget(c)
	c.nc.SetReadDeadline(time.Time{})
	c.pk.state.Store(pkRunning)
	if c.run() {
		return
	}
	c.srv.connEnded(c)
}

// close closes the connection (transport.close) and resumes its reader if
// it is parked, so that the connection's end runs on it. Safe to call
// more than once and from any goroutine.
func (c *serverConn) close(err error) {
	c.transport.close(err)
	if c.pk.rc != nil {
		c.srv.parker.closing(c)
	}
}

// The runtime keeps the stack of an exited goroutine with it, for the next
// goroutine it starts (at the average stack size it saw at the last GC),
// and frees those stacks only at a GC. An idle server allocates little, so
// without one the stacks of the readers that parked would stay resident
// until the runtime's forced GC, every two minutes. So at the end of a
// burst of parks (two housekeeping passes in a row that found no new
// park) the
// housekeeper runs one GC, which frees them and lets the scavenger return
// the pages: only once parkGCAfter readers (at 4 to 8 KiB, 1 to 2 MiB of
// stacks) parked since the last, and at most once per parkGCEvery.
// Connections parking without a pause leave it to the runtime's own GCs.
// A GC of an idle proxy's small heap costs a few milliseconds of CPU, so
// at most one per parkGCEvery is nothing; with 1,024 parks needed, 1,000
// connections gone idle kept 11 KiB of RSS each (18 after one call each)
// for two minutes, against 7.5 (8.9) now (loadtest/bench/idleconns).
const (
	parkGCAfter = 256
	parkGCEvery = 10 * time.Second
)

// collectParkedStacks runs on the housekeeper after each pass.
func (s *Server) collectParkedStacks(now time.Time) {
	if s.parker.gcDue(now) {
		debug.FreeOSMemory()
	}
}
