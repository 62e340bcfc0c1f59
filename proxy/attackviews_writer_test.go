//go:build unix

package proxy_test

import (
	"encoding/binary"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// dialTiny is dialRawWide over a socket with a receive buffer of a few
// KiB, so that a client that does not read soon blocks the proxy's writer
// in its write to the socket.
func dialTiny(t *testing.T, addr string) *rawConn {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	nc, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	io.WriteString(nc, http2.ClientPreface)
	fr := http2.NewFramer(nc, nc)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	r := &rawConn{t: t, nc: nc, fr: fr}
	fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
	fr.WriteWindowUpdate(0, 1<<30)
	return r
}

// streamRequest is the request of rawStreamServer: count messages of the
// sizes, cycled, seeded by seed.
func streamRequest(seed, count uint32, sizes ...uint32) []byte {
	req := binary.BigEndian.AppendUint32(nil, seed)
	req = binary.BigEndian.AppendUint32(req, count)
	for _, s := range sizes {
		req = binary.BigEndian.AppendUint32(req, s)
	}
	return append(binary.BigEndian.AppendUint32([]byte{0}, uint32(len(req))), req...)
}

// TestAttackViewsFreedWhileWriterBlocked: a client that does not read
// blocks the proxy's writer toward it in a write to the socket, with
// views of a backend connection's read buffers queued on its streams.
// It then resets the streams (their queues are dropped while the writer
// runs: the views go to transport.toRelease, for the writer to free after
// its write) and closes the connection: the write fails and the writer
// exits (writeStep, stepExit) without freeing what toRelease holds. The
// views are never freed: the backend connection, which lives on, keeps
// the read buffers counted as pinned for good (maxPinnedReadBufs of them
// and it makes no view again; the buffers never go back to the pool).
func TestAttackViewsFreedWhileWriterBlocked(t *testing.T) {
	verifyNoLeaks(t)
	addr := rawStreamServer(t)
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	ctx := testkit.Context(t, 20*time.Second)

	// Each round strands the views its writer had in toRelease; after
	// a few, every buffer the backend connection may pin is stranded.
	var stuck []int
	for round := range 4 {
		r := dialTiny(t, ln.Addr().String())
		const streams = 8
		for i := range streams {
			id := uint32(2*i + 1)
			r.headers(id, "/x.Y/Z", false)
			r.fr.WriteData(id, true, streamRequest(uint32(i), 4000, 16379, 8000, 5000))
		}
		// The writer blocks; the queues fill with views up to the windows.
		testkit.WaitFor(ctx, t, "views queued behind a blocked writer", func() bool {
			return srv.PinnedReadBufs() > 0 && srv.MaxBufferedBytes() > 100_000
		})
		time.Sleep(300 * time.Millisecond)
		for i := range streams {
			r.fr.WriteRSTStream(uint32(2*i+1), http2.ErrCodeCancel)
		}
		time.Sleep(100 * time.Millisecond)
		r.nc.Close()
		time.Sleep(500 * time.Millisecond)
		stuck = append(stuck, srv.PinnedReadBufs())
		if round == 0 && stuck[0] == 0 {
			break
		}
	}
	t.Logf("read buffers pinned after each round, with every call over: %v", stuck)
	waitViewsFreed(t, srv, "client reset its streams, then closed, while the proxy's writer was blocked")
}
