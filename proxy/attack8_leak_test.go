package proxy_test

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// heldThenFaultBackend answers every call with gRPC headers, a complete
// message of 6000 bytes (a view), then the first 4096+1+4096+7 bytes of a
// 12000-byte message (views and copies, held back), and after calls calls
// does fault to all of them: "close", "goaway" (GOAWAY, close), "rst"
// (RST_STREAM each), "trailers" (OK trailers each).
func heldThenFaultBackend(calls int, fault string) func(net.Conn) {
	msg := func(n, have int) []byte {
		b := make([]byte, 5+have)
		binary.BigEndian.PutUint32(b[1:], uint32(n))
		for i := 5; i < len(b); i++ {
			b[i] = byte(i)
		}
		return b
	}
	whole := msg(6000, 6000)
	part := msg(12000, 4096+1+4096+7-5)
	return func(nc net.Conn) {
		br := bufio.NewReader(nc)
		if _, err := io.ReadFull(br, make([]byte, len(http2.ClientPreface))); err != nil {
			return
		}
		bw := bufio.NewWriterSize(nc, 256<<10)
		fr := http2.NewFramer(bw, br)
		fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		fr.WriteSettings()
		bw.Flush()
		var ids []uint32
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame, *http2.PingFrame:
				testkit.AckControl(fr, f)
			case *http2.MetaHeadersFrame:
				id := f.StreamID
				ids = append(ids, id)
				writeGRPCHeaders(fr, id)
				fr.WriteData(id, false, whole)
				fr.WriteData(id, false, part[:4096])
				fr.WriteData(id, false, part[4096:4097])
				fr.WriteData(id, false, part[4097:8193])
				fr.WriteData(id, false, part[8193:])
			}
			if bw.Flush() != nil {
				return
			}
			if len(ids) == calls {
				time.Sleep(400 * time.Millisecond)
				switch fault {
				case "rst":
					for _, id := range ids {
						fr.WriteRSTStream(id, http2.ErrCodeInternal)
					}
				case "trailers":
					for _, id := range ids {
						writeOKTrailers(fr, id)
					}
				case "goaway":
					fr.WriteGoAway(ids[len(ids)-1], http2.ErrCodeNo, nil)
				}
				bw.Flush()
				if fault == "close" || fault == "goaway" {
					return
				}
				ids = nil
			}
		}
	}
}

// TestAttack8HeldFreedAfterBackendFault: a client that never reads (stream
// windows of 0) has calls whose backend queued a complete message toward
// it and holds part of the next (views and copies); then the backend
// fails them all. What the budget counts must fall to the complete
// messages queued, and to nothing once the client resets its streams;
// the read buffers views pinned must all be let go.
func TestAttack8HeldFreedAfterBackendFault(t *testing.T) {
	for _, fault := range []string{"close", "goaway", "rst", "trailers"} {
		t.Run(fault, func(t *testing.T) {
			const calls = 24
			addr := rawBackend(t, heldThenFaultBackend(calls, fault))
			srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog})
			if err != nil {
				t.Fatal(err)
			}
			ln := serveProxy(t, srv)
			r := dialRawPreface(t, ln.Addr().String())
			r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
			for i := range calls {
				id := uint32(2*i + 1)
				r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: requestBlock("/x.Y/Z"), EndHeaders: true})
				r.fr.WriteData(id, true, make([]byte, 5))
			}
			go io.Copy(io.Discard, r.nc)
			ctx := testkit.Context(t, 10*time.Second)
			time.Sleep(250 * time.Millisecond)
			t.Logf("before the fault: budget %d KiB, pinned %d (process %d)", srv.MaxBufferedBytes()>>10, srv.PinnedReadBufs(), proxy.PinnedReadBufsTotal())
			time.Sleep(500 * time.Millisecond)
			mid := srv.MaxBufferedBytes()
			t.Logf("after the fault: budget %d KiB, pinned %d (process %d)", mid>>10, srv.PinnedReadBufs(), proxy.PinnedReadBufsTotal())
			if fault != "trailers" && mid > calls*(6005+16384+1024) {
				t.Errorf("after the fault the budget counts %d B, more than the complete messages queued", mid)
			}
			for i := range calls {
				r.fr.WriteRSTStream(uint32(2*i+1), http2.ErrCodeCancel)
			}
			for ctx.Err() == nil && (srv.MaxBufferedBytes() != 0 || proxy.PinnedReadBufsTotal() != 0) {
				time.Sleep(20 * time.Millisecond)
			}
			if n, p := srv.MaxBufferedBytes(), proxy.PinnedReadBufsTotal(); n != 0 || p != 0 {
				t.Errorf("after the client reset its streams: budget %d B, %d read buffers pinned", n, p)
			}
		})
	}
}
