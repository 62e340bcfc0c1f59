package proxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// The stress of h2rd_stress_test.go through the frame loop's own code: the
// transport's nextBuffered, takeData and plainControl decide what is taken
// from the read buffer, and the x/net Framer (through the contGuard) reads
// the rest, as readLoop does on a backend connection (views set). The
// frames are DATA (some padded), PING, WINDOW_UPDATE, RST_STREAM and a
// type the Framer does not know, of the lengths around the slack's
// arithmetic; every frame's payload is checked against what was sent, and
// DATA taken from the buffer is viewed as backendConn.onData does.

type h2rdWant struct {
	typ   http2.FrameType
	flags http2.Flags
	id    uint32
	data  []byte // DATA: without padding
	raw   []byte // the payload as sent
}

// h2rdFrames builds a stream of valid frames and what each carries.
func h2rdFrames(rng *rand.Rand, total int) ([]byte, []h2rdWant, []int) {
	var s []byte
	var want []h2rdWant
	var offs []int
	for len(s) < total {
		n := min(h2rdLength(rng, len(s)), maxFrameSize)
		w := h2rdWant{typ: http2.FrameData, id: 1 + 2*uint32(rng.IntN(50))}
		switch k := rng.IntN(10); {
		case k == 0:
			w.typ, w.id, n = http2.FramePing, 0, 8
			if rng.IntN(2) == 0 {
				w.flags = http2.FlagPingAck
			}
		case k == 1:
			w.typ, n = http2.FrameWindowUpdate, 4
			w.id = uint32(rng.IntN(3)) * 2 // 0 or even: streams the test need not know
		case k == 2:
			w.typ, n = http2.FrameRSTStream, 4
		case k == 3:
			w.typ = 0x21 // unknown: the Framer reads and skips it
		default:
			if rng.IntN(2) == 0 {
				w.flags |= http2.FlagDataEndStream
			}
		}
		payload := make([]byte, n)
		for i := range payload {
			payload[i] = byte(rng.Uint32())
		}
		switch w.typ {
		case http2.FrameWindowUpdate:
			binary.BigEndian.PutUint32(payload, 1+uint32(rng.IntN(1<<20)))
		case http2.FrameData:
			w.data = payload
			if n > 0 && rng.IntN(5) == 0 {
				w.flags |= http2.FlagDataPadded
				pad := rng.IntN(min(n, 256))
				payload[0] = byte(pad)
				w.data = payload[1 : n-pad]
			}
		}
		w.raw = payload
		offs = append(offs, len(s))
		s = append(s, byte(n>>16), byte(n>>8), byte(n), byte(w.typ), byte(w.flags))
		s = binary.BigEndian.AppendUint32(s, w.id)
		s = append(s, payload...)
		want = append(want, w)
	}
	return s, want, offs
}

func TestH2rdFrameLoopStress(t *testing.T) {
	iters, seed0 := h2rdKnobs()
	var taken, framer, views int
	for it := 0; it < iters; it++ {
		for _, mode := range []struct {
			network          string
			pauses, truncate bool
		}{{"unix", false, false}, {"unix", true, true}, {"tcp", true, false}, {"tcp", false, true}} {
			seed := seed0 + uint64(it)*7919
			ok := t.Run(fmt.Sprintf("%s/pauses=%v/truncate=%v/seed=%d", mode.network, mode.pauses, mode.truncate, seed), func(t *testing.T) {
				wc, rc := h2rdPair(t, mode.network)
				rng := rand.New(rand.NewPCG(seed, 2))
				s, want, offs := h2rdFrames(rng, 1<<20+rng.IntN(1<<20))
				if mode.truncate {
					i := len(want) - 1 - rng.IntN(min(3, len(want)))
					cut := offs[i] + rng.IntN(frameHeaderLen+len(want[i].raw))
					s, want = s[:cut], want[:i]
				}
				werr := make(chan error, 1)
				go func() { werr <- h2rdWrite(wc, s, seed, mode.pauses) }()

				tr := &transport{views: true, sawFrame: true, maxHeaderList: 16 << 10}
				tr.cr = newConnReader(rc)
				tr.cg = &contGuard{r: tr.cr}
				tr.newReadFramer()
				var held []h2rdView
				free := func(v h2rdView) {
					if !bytes.Equal(v.v.b, v.want) {
						t.Errorf("view of the frame at %d changed", v.at)
					}
					putBuf(v.v)
				}
				defer func() {
					for _, v := range held {
						free(v)
					}
					tr.cr.release()
					if got := tr.cr.pinnedBufs(); got != 0 {
						t.Errorf("%d read buffers still pinned", got)
					}
				}()
				start := time.Now()
				for i, w := range want {
					if time.Since(start) > 20*time.Second {
						t.Fatalf("too slow: frame %d of %d", i, len(want))
					}
					fh, payload, ok := tr.nextBuffered()
					switch {
					case ok && tr.takeData(fh, payload):
						taken++
						data := tr.df.data
						if fh.Type != w.typ || fh.Flags != w.flags || fh.StreamID != w.id || !bytes.Equal(data, w.data) {
							t.Fatalf("frame %d at %d (%v, %d bytes): taken from the buffer, differs", i, offs[i], w.typ, len(w.raw))
						}
						if len(data) >= vecMin && rng.IntN(4) != 0 {
							if v := tr.cr.view(data); v != nil {
								views++
								held = append(held, h2rdView{v: v, want: w.data, at: offs[i]})
							}
						}
						tr.df = dataFrame{}
						tr.cr.discard(frameHeaderLen + len(payload))
					case ok && plainControl(fh, payload):
						taken++
						if fh.Type != w.typ || fh.Flags != w.flags || fh.StreamID != w.id || !bytes.Equal(payload, w.raw) {
							t.Fatalf("frame %d at %d (%v): taken from the buffer, differs", i, offs[i], w.typ)
						}
						tr.tookBuffered()
						tr.cr.discard(frameHeaderLen + len(payload))
					default:
						framer++
						f, err := tr.rfr.ReadFrame()
						if err != nil {
							t.Fatalf("frame %d at %d (%v, %d bytes): Framer: %v", i, offs[i], w.typ, len(w.raw), err)
						}
						h := f.Header()
						var got []byte
						switch f := f.(type) {
						case *http2.DataFrame:
							got = f.Data()
						case *http2.PingFrame:
							got = f.Data[:]
						case *http2.WindowUpdateFrame:
							got = binary.BigEndian.AppendUint32(nil, f.Increment)
						case *http2.RSTStreamFrame:
							got = binary.BigEndian.AppendUint32(nil, uint32(f.ErrCode))
						case *http2.UnknownFrame:
							got = f.Payload()
						}
						exp := w.raw
						if w.typ == http2.FrameData {
							exp = w.data
						}
						if h.Type != w.typ || h.Flags != w.flags || h.StreamID != w.id || !bytes.Equal(got, exp) {
							t.Fatalf("frame %d at %d (%v, %d bytes): through the Framer, differs", i, offs[i], w.typ, len(w.raw))
						}
					}
					for len(held) > 0 && (len(held) > 5 || rng.IntN(3) == 0) {
						j := rng.IntN(len(held))
						free(held[j])
						held = append(held[:j], held[j+1:]...)
					}
				}
				// The end: nothing more taken from the buffer, and the
				// Framer reads EOF, or the cut frame's part and an error.
				if _, _, ok := tr.nextBuffered(); ok {
					t.Fatal("a frame after the last one sent")
				}
				_, err := tr.rfr.ReadFrame()
				tail := len(want) < len(offs) && offs[len(want)] < len(s) // part of a frame was sent
				switch {
				case tail && err == nil:
					t.Fatal("the cut frame read whole")
				case !tail && err != io.EOF:
					t.Fatalf("after the last frame: %v, want EOF", err)
				case tail && !errors.Is(err, io.ErrUnexpectedEOF) && err != io.EOF:
					// EOF: the header whole, no payload byte (io.ReadFull).
					t.Fatalf("after the cut frame's %d bytes: %v, want EOF", len(s)-offs[len(want)], err)
				}
				if err := <-werr; err != nil {
					t.Errorf("writer: %v", err)
				}
			})
			if !ok {
				return
			}
		}
	}
	t.Logf("taken from the buffer %d, through the Framer %d, views %d", taken, framer, views)
}
