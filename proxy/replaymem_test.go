package proxy_test

import (
	"encoding/binary"
	"runtime"
	"testing"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/proxy"
)

// heapInUse returns the live heap after two collections (sync.Pool keeps
// released buffers for one more cycle).
func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// TestReplayTinyFrames: a retryable call sent as 10,000 one-byte DATA
// frames, each written to the backend before the next arrives, must not
// keep a 16 KiB buffer per frame for its replay (it held 160 MiB against
// the 64 KiB retry buffer when the replay was counted by payload).
func TestReplayTinyFrames(t *testing.T) {
	verifyNoLeaks(t)
	// The PINGs that pace the frames would spend the glitch budget, and
	// 5,000 of them waiting PingAckDelay each for other frames would take
	// 25 s.
	e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.MaxGlitches = -1; c.PingAckDelay = -1 }})
	r := dialRaw(t, e.addr)
	r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
	before := heapInUse()
	// A message prefix promising more than is sent: the backend waits for
	// the rest and does not answer, so the attempt keeps its replay.
	r.headers(1, "/grpc.testing.TestService/UnaryCall", false)
	prefix := make([]byte, 5)
	binary.BigEndian.PutUint32(prefix[1:], 1<<20)
	r.fr.WriteData(1, false, prefix)
	const frames = 10000
	for i := range frames {
		if err := r.fr.WriteData(1, false, []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		if i%2 == 1 {
			// A round trip now and then, so the proxy's writer sends
			// the frames one by one instead of coalescing them.
			r.fr.WritePing(false, [8]byte{byte(i)})
			r.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
		}
	}
	r.fr.WritePing(false, [8]byte{'e', 'n', 'd'})
	r.next(func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
	after := heapInUse()
	grew := int64(after) - int64(before)
	t.Logf("heap in use %d KiB before, %d KiB after %d one-byte DATA frames: %+d KiB", before>>10, after>>10, frames, grew>>10)
	if grew > 8<<20 {
		t.Errorf("heap grew %d MiB for %d bytes of request, want well under 8 MiB", grew>>20, frames)
	}
	// The call still works: its end reaches the backend, which answers.
	r.fr.WriteRSTStream(1, http2.ErrCodeCancel)
	r.headers(3, "/grpc.testing.TestService/UnaryCall", false)
	r.fr.WriteData(3, true, grpcMsg(&testgrpc.SimpleRequest{ResponseSize: 1}))
	r.next(func(f http2.Frame) bool {
		h, ok := f.(*http2.MetaHeadersFrame)
		return ok && h.StreamID == 3 && h.StreamEnded()
	})
}
