package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// drainingBackend is a raw HTTP/2 backend that shuts down as grpc-go's
// GracefulStop does, on a connection with a call in flight. It holds the
// answer to the first EmptyCall (closing held when its request is in);
// once drain is closed it sends GOAWAY with stream id 2^31-1 and a PING;
// once the PING is acknowledged, GOAWAY with the last stream id it saw,
// the held answer, and, with no stream left, it closes the connection.
//
// A stream whose HEADERS arrive just after the acknowledgement is counted
// in late, named in the second GOAWAY, and closed with the connection
// unanswered. grpc-go can do exactly that to a stream whose HEADERS race
// its second GOAWAY: its loopy writer closes the connection when the last
// stream it knows of ends, before it has registered the late one. This is
// why a client must open no stream after a GOAWAY (RFC 9113 §6.8).
type drainingBackend struct {
	held  chan struct{} // closed when the first request is complete
	drain chan struct{} // closed by the test: start shutting down
	acked chan struct{} // closed when the shutdown PING was acknowledged
	late  atomic.Int64  // HEADERS received after the acknowledgement
}

// shutdownPing is the data of the shutdown PING (grpc-go's goAwayPing).
var shutdownPing = [8]byte{1, 6, 1, 8, 0, 3, 3, 9}

func (d *drainingBackend) serve(nc net.Conn) {
	br := bufio.NewReader(nc)
	if _, err := io.ReadFull(br, make([]byte, len(http2.ClientPreface))); err != nil {
		return
	}
	fr := http2.NewFramer(nc, br)
	var (
		wmu  sync.Mutex // guards fr's write side, enc and hbuf
		hbuf bytes.Buffer
	)
	enc := hpack.NewEncoder(&hbuf)
	write := func(fn func() error) error {
		wmu.Lock()
		defer wmu.Unlock()
		return fn()
	}
	block := func(fields ...string) []byte {
		hbuf.Reset()
		for i := 0; i < len(fields); i += 2 {
			enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
		}
		return bytes.Clone(hbuf.Bytes())
	}
	answer := func(id uint32) error {
		return write(func() error {
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndHeaders: true,
				BlockFragment: block(":status", "200", "content-type", "application/grpc")}); err != nil {
				return err
			}
			if err := fr.WriteData(id, false, make([]byte, 5)); err != nil { // an empty message
				return err
			}
			return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndHeaders: true, EndStream: true,
				BlockFragment: block("grpc-status", "0")})
		})
	}
	if write(func() error { return fr.WriteSettings() }) != nil {
		return
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-d.drain:
		case <-stop:
			return
		}
		write(func() error {
			if err := fr.WriteGoAway(1<<31-1, http2.ErrCodeNo, nil); err != nil {
				return err
			}
			return fr.WritePing(false, shutdownPing)
		})
	}()
	var lastID, heldID uint32
	acked := false
	for {
		if acked {
			// A stream opened before the second GOAWAY would arrive now.
			nc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		}
		f, err := fr.ReadFrame()
		if acked && (err != nil || f.Header().Type == http2.FrameHeaders) {
			if err == nil {
				d.late.Add(1)
				lastID = f.Header().StreamID
			}
			write(func() error { return fr.WriteGoAway(lastID, http2.ErrCodeNo, nil) })
			answer(heldID)
			return // the held stream is done: close, with any late one unanswered
		}
		if err != nil {
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				write(func() error { return fr.WriteSettingsAck() })
			}
		case *http2.PingFrame:
			switch {
			case !f.IsAck():
				write(func() error { return fr.WritePing(true, f.Data) })
			case f.Data == shutdownPing:
				acked = true
				close(d.acked)
			}
		case *http2.HeadersFrame:
			lastID = f.StreamID
		case *http2.DataFrame:
			if !f.StreamEnded() {
				continue
			}
			if heldID == 0 {
				heldID = f.StreamID
				close(d.held)
				continue
			}
			answer(f.StreamID)
		}
	}
}

// TestNoStreamAfterGoAway: a call whose stream slot was reserved on a
// backend connection just before the backend's graceful GOAWAY arrived is
// not opened on that connection (RFC 9113 §6.8: no new stream after a
// GOAWAY), but goes to another backend, and succeeds. Before the fix it
// was opened after the GOAWAY, raced the backend's second GOAWAY, and was
// lost with "backend connection lost: EOF".
func TestNoStreamAfterGoAway(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	good := e.backends[0].Addr()
	d := &drainingBackend{held: make(chan struct{}), drain: make(chan struct{}), acked: make(chan struct{})}
	bad := rawBackend(t, d.serve)
	// The first two calls go to the draining backend, retries to the good one.
	var picks atomic.Int64
	picker := proxy.PickerFunc(func(ctx context.Context, _ string) (string, func(error), error) {
		if picks.Add(1) <= 2 {
			return bad, nil, nil
		}
		return good, nil, nil
	})
	srv, err := proxy.New(proxy.Config{Picker: picker, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	var reserved atomic.Int64
	proxy.SetAfterReserve(srv, func(addr string) {
		if addr != bad || reserved.Add(1) != 2 {
			return
		}
		// The second call has its slot on the connection: the backend's
		// GOAWAY arrives now, and the proxy has read it once it
		// acknowledges the PING that follows.
		close(d.drain)
		select {
		case <-d.acked:
		case <-time.After(10 * time.Second):
			t.Error("the proxy did not acknowledge the shutdown PING")
		}
	})
	ln := serveProxy(t, srv)
	client := testgrpc.NewTestServiceClient(e.dial(ln.Addr().String()))
	ctx := testkit.Context(t, 20*time.Second)
	first := make(chan error, 1)
	go func() {
		_, err := client.EmptyCall(ctx, &testgrpc.Empty{})
		first <- err
	}()
	select {
	case <-d.held:
	case <-ctx.Done():
		t.Fatal("the first call did not reach the backend")
	}
	if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Errorf("the call reserved before the GOAWAY: %v", err)
	}
	if err := <-first; err != nil {
		t.Errorf("the call in flight at the GOAWAY: %v", err)
	}
	if n := d.late.Load(); n != 0 {
		t.Errorf("%d streams opened on the backend connection after its GOAWAY, want 0", n)
	}
	if n := e.backends[0].Calls(); n != 1 {
		t.Errorf("the good backend served %d calls, want 1 (the second, retried)", n)
	}
}
