package proxy_test

import (
	"context"
	"encoding/binary"
	"net"
	"runtime"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// churnBackend answers every call with its response HEADERS, then views
// DATA frames of viewSize bytes each (one complete gRPC message each), each
// written alone after a pause so that the proxy's reader takes it into a
// read buffer of its own, then OK trailers; after perConn calls it sends
// GOAWAY and closes the connection, so the proxy opens a new one.
func churnBackend(perConn, frames, viewSize int) func(net.Conn) {
	msg := make([]byte, viewSize)
	msg[0] = 0
	binary.BigEndian.PutUint32(msg[1:], uint32(viewSize-5))
	for i := 5; i < viewSize; i++ {
		msg[i] = byte(i)
	}
	return func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		s.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		served := 0
		var last uint32
		s.serve(func(f http2.Frame) bool {
			h, ok := f.(*http2.MetaHeadersFrame)
			if !ok {
				return true
			}
			last = h.StreamID
			writeGRPCHeaders(s.fr, h.StreamID)
			for range frames {
				time.Sleep(3 * time.Millisecond)
				s.fr.WriteData(h.StreamID, false, msg)
			}
			time.Sleep(3 * time.Millisecond)
			writeOKTrailers(s.fr, h.StreamID)
			served++
			if served >= perConn {
				time.Sleep(20 * time.Millisecond)
				s.fr.WriteGoAway(last, http2.ErrCodeNo, nil)
				return false
			}
			return true
		})
	}
}

func heapInuse() uint64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// TestAttackViewsPinnedMemoryChurn: a client that grants no window (never
// reads) calls a backend whose answers are DATA frames of 4 KiB, each in a
// read of its own, and which closes its connection after each call. Each
// 4 KiB view queued toward the client pins the whole 64 KiB read buffer
// under it while the budget counts 4 KiB (readref.go). The first version
// bounded pinned buffers per connection reader only, and a view kept its
// closed connection's reader from the collector: a new backend connection
// started again from 0, and 96 calls held 7.1 MiB of heap for 1 MiB
// counted (2.2 MiB with views off). The process-wide bound
// (maxPinnedReadBufsTotal, 2 MiB) keeps the heap within 4x the budget
// plus that.
func TestAttackViewsPinnedMemoryChurn(t *testing.T) {
	const (
		calls   = 96
		perConn = 1
		frames  = 4 // 4 x 4 KiB = the default 16 KiB backend stream window
		size    = 4096
	)
	addr := rawBackend(t, churnBackend(perConn, frames, size))
	picker := proxy.PickerFunc(func(context.Context, string) (string, func(error), error) { return addr, nil, nil })
	srv, err := proxy.New(proxy.Config{Picker: picker, Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	base := heapInuse()

	r := dialRawPreface(t, ln.Addr().String())
	r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	req := make([]byte, 5)
	for i := range calls {
		id := uint32(2*i + 1)
		r.headers(id, "/grpc.testing.TestService/StreamingOutputCall", false)
		r.fr.WriteData(id, true, req)
		// One at a time: each call's frames reach the proxy's reader
		// one read each.
		time.Sleep(time.Duration(frames+2) * 4 * time.Millisecond)
	}
	ctx := testkit.Context(t, 8*time.Second)
	want := int64(calls * frames * size * 9 / 10)
	for srv.MaxBufferedBytes() < want && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	if srv.MaxBufferedBytes() < want {
		t.Logf("only %d of %d bytes queued", srv.MaxBufferedBytes(), want)
	}
	time.Sleep(200 * time.Millisecond)
	counted := srv.MaxBufferedBytes()
	held := int64(heapInuse()) - int64(base)
	t.Logf("%d calls of %d x %d B: budget counts %d KiB, heap grew %d KiB (%.1fx), pinned on live backend conns %d",
		calls, frames, size, counted>>10, held>>10, float64(held)/float64(counted), srv.PinnedReadBufs())
	t.Logf("read buffers pinned by views in the process: %d", proxy.PinnedReadBufsTotal())
	if held > 4*counted+(2<<20) {
		t.Errorf("heap in use grew %d KiB while the client connection's budget counts %d KiB: views pin 64 KiB read buffers for 4 KiB each, and the per-connection pin limit restarts on every new backend connection", held>>10, counted>>10)
	}
	r.nc.Close()
}
