//go:build unix

package proxy_test

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// waitTotalPins waits up to d for the process's count of read buffers
// pinned by views to fall to 0, and fails with what is left.
func waitTotalPins(t *testing.T, d time.Duration, what string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if proxy.PinnedReadBufsTotal() == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("%s: %d read buffers of the process still pinned by views %v after every call ended", what, proxy.PinnedReadBufsTotal(), d)
}

// r2Reader reads every frame of r on its own goroutine until stop, granting
// window as it goes in small steps (grant bytes at a time per stream, and
// per connection), so that the proxy's writer writes view items in parts
// (sendQueue item off advancing). It counts DATA bytes and ended streams.
type r2Reader struct {
	data  atomic.Int64
	mu    sync.Mutex
	ended map[uint32]bool
	done  chan struct{}
}

func (rd *r2Reader) end(id uint32) {
	rd.mu.Lock()
	rd.ended[id] = true
	rd.mu.Unlock()
}

func (rd *r2Reader) count() int {
	rd.mu.Lock()
	defer rd.mu.Unlock()
	return len(rd.ended)
}

func startR2Reader(r *rawConn, wmu *sync.Mutex, grant uint32) *r2Reader {
	rd := &r2Reader{done: make(chan struct{}), ended: map[uint32]bool{}}
	go func() {
		defer close(rd.done)
		for {
			f, err := r.fr.ReadFrame()
			if err != nil {
				return
			}
			switch f := f.(type) {
			case *http2.DataFrame:
				n := f.Header().Length
				rd.data.Add(int64(n))
				if n > 0 && grant > 0 {
					wmu.Lock()
					r.fr.WriteWindowUpdate(0, n)
					r.fr.WriteWindowUpdate(f.StreamID, n)
					wmu.Unlock()
				}
				if f.StreamEnded() {
					rd.end(f.StreamID)
				}
			case *http2.MetaHeadersFrame:
				if f.StreamEnded() {
					rd.end(f.StreamID)
				}
			case *http2.RSTStreamFrame:
				rd.end(f.StreamID)
			}
		}
	}()
	return rd
}

// TestAttackR2PinsAfterResetStorm: clients that read (their writer is
// not blocked), with small or wide windows, reset their streams at random
// moments while large answers are relayed as views; the connections stay
// open and idle afterwards. Once every call ended, no read buffer of the
// process may stay pinned: a view left in a live client connection's
// toRelease (a drop while its writer runs, then the writer goes idle or is
// reaped without another step) would pin it for as long as the client
// stays connected, and 32 such pins turn views off for the process.
func TestAttackR2PinsAfterResetStorm(t *testing.T) {
	verifyNoLeaks(t)
	addr := rawStreamServer(t)
	for _, grant := range []uint32{0, 4096} {
		name := "wide"
		if grant > 0 {
			name = "small-window"
		}
		t.Run(name, func(t *testing.T) {
			srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog})
			if err != nil {
				t.Fatal(err)
			}
			ln := serveProxy(t, srv)
			rng := rand.New(rand.NewPCG(7, uint64(grant)))
			var conns []*rawConn
			var readers []*r2Reader
			const nconns = 4
			var wmus [nconns]sync.Mutex
			for c := range nconns {
				r := dialRawPreface(t, ln.Addr().String())
				r.nc.SetDeadline(time.Now().Add(60 * time.Second))
				if grant == 0 {
					r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
					r.fr.WriteWindowUpdate(0, 1<<30)
				} else {
					r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: grant})
				}
				conns = append(conns, r)
				readers = append(readers, startR2Reader(r, &wmus[c], grant))
			}
			var maxPins atomic.Int32
			stopSample := make(chan struct{})
			go func() {
				for {
					select {
					case <-stopSample:
						return
					case <-time.After(time.Millisecond):
					}
					if n := proxy.PinnedReadBufsTotal(); n > maxPins.Load() {
						maxPins.Store(n)
					}
				}
			}()
			deadline := time.Now().Add(6 * time.Second)
			opened := 0
			for round := 0; round < 30 && time.Now().Before(deadline); round++ {
				for c, r := range conns {
					id := uint32(2*round + 1)
					wmus[c].Lock()
					r.headers(id, "/x.Y/Z", false)
					r.fr.WriteData(id, true, streamRequest(uint32(round*16+c), 60, 16379, 8000, 5000, 70000))
					wmus[c].Unlock()
					opened++
				}
				time.Sleep(time.Duration(rng.IntN(8)) * time.Millisecond)
				for c, r := range conns {
					if rng.IntN(4) == 0 {
						continue // this one runs to its end
					}
					time.Sleep(time.Duration(rng.IntN(3)) * time.Millisecond)
					wmus[c].Lock()
					r.fr.WriteRSTStream(uint32(2*round+1), http2.ErrCodeCancel)
					wmus[c].Unlock()
					readers[c].end(uint32(2*round + 1))
				}
			}
			ctx := testkit.Context(t, 30*time.Second)
			testkit.WaitFor(ctx, t, "every stream ended", func() bool {
				n := 0
				for _, rd := range readers {
					n += rd.count()
				}
				return n >= opened
			})
			var bytes int64
			for _, rd := range readers {
				bytes += rd.data.Load()
			}
			close(stopSample)
			t.Logf("%d calls, %d DATA bytes read, at most %d read buffers pinned", opened, bytes, maxPins.Load())
			if maxPins.Load() == 0 {
				t.Error("no view was made: the test tests nothing")
			}
			// The client connections stay open (and idle) from here on;
			// the housekeeper reaps parked writers about once a second.
			waitTotalPins(t, 5*time.Second, name)
			for _, r := range conns {
				r.nc.Close()
			}
		})
	}
}

// TestAttackR2PinsAfterCloseWithBlockedWriter: clients that do not read
// (their socket's receive buffer is tiny, so the proxy's writer blocks in
// a write with views referenced and queued), then the proxy is closed
// (Close, not Shutdown), or shut down with a context that expires at
// once. Every pin must go.
func TestAttackR2PinsAfterCloseWithBlockedWriter(t *testing.T) {
	verifyNoLeaks(t)
	addr := rawStreamServer(t)
	for _, how := range []string{"close", "shutdown-expired"} {
		t.Run(how, func(t *testing.T) {
			srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog})
			if err != nil {
				t.Fatal(err)
			}
			ln := serveProxy(t, srv)
			ctx := testkit.Context(t, 20*time.Second)
			for c := range 3 {
				r := dialTiny(t, ln.Addr().String())
				for i := range 6 {
					id := uint32(2*i + 1)
					r.headers(id, "/x.Y/Z", false)
					r.fr.WriteData(id, true, streamRequest(uint32(c*10+i), 4000, 16379, 8000, 5000))
				}
			}
			testkit.WaitFor(ctx, t, "views queued behind blocked writers", func() bool {
				return proxy.PinnedReadBufsTotal() > 0 && srv.MaxBufferedBytes() > 100_000
			})
			time.Sleep(200 * time.Millisecond)
			t.Logf("pinned before: %d", proxy.PinnedReadBufsTotal())
			switch how {
			case "close":
				srv.Close()
			default:
				sctx, cancel := context.WithCancel(context.Background())
				cancel()
				srv.Shutdown(sctx)
			}
			waitTotalPins(t, 5*time.Second, how)
		})
	}
}
