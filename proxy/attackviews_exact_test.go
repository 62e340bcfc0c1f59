package proxy_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/streamlb/streamlb/proxy"
)

// randomScript is a response script (scriptBackend) of DATA frames of
// sizes around the view threshold, the frame limit and the read buffer's
// size, some padded, some written back to back, ending with trailers, an
// empty END_STREAM DATA frame or END_STREAM on the last DATA frame. It
// returns the script and the payload bytes it carries.
func randomScript(rng *rand.Rand, maxBytes int) (string, int) {
	sizes := []int{1, 5, 100, 4090, 4095, 4096, 4097, 4100, 8192, 12000, 16374, 16375, 16383, 16384}
	steps := []string{"h"}
	total := 0
	for total < maxBytes {
		n := sizes[rng.IntN(len(sizes))]
		if rng.IntN(5) == 0 {
			n = 1 + rng.IntN(16384)
		}
		if total+n > maxBytes {
			break
		}
		pre := ""
		if rng.IntN(2) == 0 {
			pre = "+"
		}
		if rng.IntN(6) == 0 && n < 16384-256 {
			pad := rng.IntN(256)
			if n+1+pad > 16384 {
				pad = 16384 - n - 1
			}
			steps = append(steps, fmt.Sprintf("%sp%d:%d", pre, n, pad))
		} else {
			steps = append(steps, fmt.Sprintf("%sd%d", pre, n))
		}
		total += n
	}
	switch rng.IntN(3) {
	case 0:
		steps = append(steps, "t")
	case 1:
		steps = append(steps, "e")
	default:
		last := steps[len(steps)-1]
		if last[0] == '+' {
			last = last[1:]
		}
		if last[0] == 'd' {
			steps[len(steps)-1] = "D" + last[1:]
		} else {
			steps = append(steps, "t")
		}
	}
	return strings.Join(steps, ","), total
}

// readAll reads every stream of want to its end, granting window as it
// reads (after a pause on odd streams, so that their answers wait in the
// proxy's queues while the backend reader reads on), and returns the DATA
// bytes of each and how each ended.
func (r *rawConn) readAll(t *testing.T, want map[uint32]int, window uint32) (map[uint32][]byte, map[uint32]string) {
	t.Helper()
	got := map[uint32][]byte{}
	how := map[uint32]string{}
	left := len(want)
	unacked := map[uint32]uint32{}
	for left > 0 {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading with %d streams left: %v", left, err)
		}
		id := f.Header().StreamID
		ended := false
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			t.Fatalf("GOAWAY %v %q", f.ErrCode, f.DebugData())
		case *http2.DataFrame:
			got[id] = append(got[id], f.Data()...)
			if n := f.Header().Length; n > 0 {
				r.fr.WriteWindowUpdate(0, n)
				unacked[id] += n
				if unacked[id] >= window/2 && !f.StreamEnded() {
					if id%4 == 3 {
						time.Sleep(time.Millisecond)
					}
					r.fr.WriteWindowUpdate(id, unacked[id])
					unacked[id] = 0
				}
			}
			if f.StreamEnded() {
				ended, how[id] = true, "data"
			}
		case *http2.MetaHeadersFrame:
			if f.StreamEnded() {
				ended, how[id] = true, "trailers "+f.PseudoValue("status")
				for _, hf := range f.Fields {
					if hf.Name == "grpc-status" {
						how[id] = "grpc-status " + hf.Value
					}
				}
			}
		case *http2.RSTStreamFrame:
			ended, how[id] = true, "reset "+f.ErrCode.String()
		}
		if ended && want[id] >= 0 {
			if _, ok := want[id]; ok {
				left--
				want[id] = -1 - want[id]
			}
		}
	}
	for id, n := range want {
		want[id] = -1 - n
	}
	return got, how
}

// TestAttackViewsExactBytes: many concurrent calls whose answers are DATA
// frames of sizes around 4 KiB (vecMin), 16 KiB (the frame limit) and the
// 64 KiB read buffer, padded or not, written apart or back to back (so
// that the reader's buffer ends inside frames), gRPC messages held back
// and not, END_STREAM on DATA; half the clients grant window slowly. Every
// byte must arrive as the backend sent it.
func TestAttackViewsExactBytes(t *testing.T) {
	verifyNoLeaks(t)
	for _, seed := range seeds(3) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 99))
			addr := scriptBackend(t, func(id uint32) []byte {
				return grpcStream(id, 1<<20, 4091, 10, 16379, 65536, 100000, 3, 200000, 8187)
			})
			const window = 32 << 10
			srv, r := viewsClient(t, addr, window)
			want := map[uint32]int{}
			scripts := map[uint32]string{}
			for i := range 24 {
				id := uint32(2*i + 1)
				sc, n := randomScript(rng, 150_000)
				want[id], scripts[id] = n, sc
				r.scriptCall(id, sc)
			}
			got, how := r.readAll(t, want, window)
			for id, n := range want {
				exp := grpcStream(id, 1<<20, 4091, 10, 16379, 65536, 100000, 3, 200000, 8187)[:n]
				if !bytes.Equal(got[id], exp) {
					at := 0
					for at < min(len(got[id]), n) && got[id][at] == exp[at] {
						at++
					}
					t.Errorf("stream %d (%s): %d bytes, want %d; first difference at %d; script %s", id, how[id], len(got[id]), n, at, scripts[id])
				}
			}
			waitViewsFreed(t, srv, "after the calls")
		})
	}
}

// seeds is 1..n, or 1..ATTACK_SEEDS when that is set (longer runs).
func seeds(n int) []uint64 {
	if v, err := strconv.Atoi(os.Getenv("ATTACK_SEEDS")); err == nil && v > 0 {
		n = v
	}
	out := make([]uint64, n)
	for i := range out {
		out[i] = uint64(i + 1)
	}
	return out
}

// viewsClient starts a proxy to the backend at addr, with backend stream
// windows wide enough for scripted answers sent without waiting, and
// returns it and a raw client connection to it that grants window per
// stream and the most the connection allows.
func viewsClient(t *testing.T, addr string, window uint32) (*proxy.Server, *rawConn) {
	t.Helper()
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog,
		BackendStreamWindow: 256 << 10, BackendMaxStreamWindow: 512 << 10})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	r := dialRawPreface(t, ln.Addr().String())
	r.nc.SetDeadline(time.Now().Add(60 * time.Second))
	r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: window})
	r.fr.WriteWindowUpdate(0, 1<<30)
	return srv, r
}
