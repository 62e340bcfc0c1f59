package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// readDataFrames reads frames from t as readLoop does, the DATA fast path
// first, until an error; it returns the DATA frames read (copied), the
// other frames' types, how many DATA frames came through the fast path,
// and the error.
func readDataFrames(t *transport) (got []string, fast int, err error) {
	for {
		if fh, payload, ok := t.bufferedFrame(); ok && t.takeData(fh, payload) {
			f := &t.df
			got = append(got, fmt.Sprintf("DATA id=%d len=%d end=%v data=%x", f.StreamID, f.Length, f.StreamEnded(), f.Data()))
			t.df = dataFrame{}
			t.cr.discard(frameHeaderLen + len(payload))
			fast++
			continue
		}
		f, err := t.readFrame()
		if err != nil {
			return got, fast, err
		}
		t.sawFrame = true
		got = append(got, describe(f))
	}
}

// sameFrames fails t unless the fast path read exactly the frames the
// Framer read (want), to the end of the input.
func sameFrames(t *testing.T, got, want []string, err error) {
	t.Helper()
	if err != io.EOF {
		t.Fatalf("read error %v, want io.EOF at the end", err)
	}
	if len(got) != len(want) {
		t.Fatalf("read %d frames, the Framer %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("frame %d: got %.120s, want %.120s", i, got[i], want[i])
		}
	}
}

func describe(f http2.Frame) string {
	if d, ok := f.(*http2.DataFrame); ok {
		return fmt.Sprintf("DATA id=%d len=%d end=%v data=%x", d.StreamID, d.Length, d.StreamEnded(), d.Data())
	}
	return f.Header().Type.String()
}

// frameScript writes a seeded mix of frames: DATA of every size up to
// the frame limit, padded or not, empty with END_STREAM, between PINGs
// and WINDOW_UPDATEs; it starts with SETTINGS, as a peer's frames do.
func frameScript(seed uint64, frames int) []byte {
	rng := rand.New(rand.NewPCG(seed, 7))
	var b bytes.Buffer
	fr := http2.NewFramer(&b, nil)
	fr.WriteSettings()
	for i := range frames {
		id := uint32(2*rng.IntN(50) + 1)
		switch k := rng.IntN(10); {
		case k == 0:
			fr.WritePing(false, [8]byte{byte(i)})
		case k == 1:
			fr.WriteWindowUpdate(id, uint32(1+rng.IntN(1000)))
		case k == 2:
			fr.WriteData(id, true, nil) // END_STREAM on an empty DATA
		default:
			n := rng.IntN(maxFrameSize + 1)
			if rng.IntN(4) == 0 {
				n = maxFrameSize
			}
			data := make([]byte, n)
			for j := range data {
				data[j] = byte(rng.Uint32())
			}
			if rng.IntN(3) == 0 {
				if n == maxFrameSize { // room for the Pad Length byte and some padding
					data = data[:n-1-rng.IntN(200)]
				}
				pad := make([]byte, rng.IntN(min(256, maxFrameSize-len(data))))
				fr.WriteDataPadded(id, rng.IntN(2) == 0, data, pad)
			} else {
				fr.WriteData(id, rng.IntN(2) == 0, data)
			}
		}
	}
	return b.Bytes()
}

// framerReads is what x/net's Framer alone reads from script.
func framerReads(t *testing.T, script []byte) []string {
	t.Helper()
	fr := http2.NewFramer(nil, bytes.NewReader(script))
	fr.SetMaxReadFrameSize(maxFrameSize)
	var out []string
	for {
		f, err := fr.ReadFrame()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("the Framer fails the script: %v", err)
		}
		out = append(out, describe(f))
	}
}

func newTestTransport(nc net.Conn) *transport {
	t := new(transport)
	t.init(65535, 65535, 1<<20, nil)
	t.attach(nc)
	return t
}

// TestBufferedDataChunks: read through the DATA fast path, with the
// socket's bytes arriving in chunks that end anywhere (inside frame
// headers, inside padding, a frame larger than what is left of the
// buffer), the frames are exactly the ones the Framer reads from the same
// bytes, and both paths are taken.
func TestBufferedDataChunks(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		chunk func(rng *rand.Rand) int
	}{
		{"whole buffer fills", func(*rand.Rand) int { return 1 << 20 }},
		{"random chunks", func(rng *rand.Rand) int { return 1 + rng.IntN(40000) }},
		{"small chunks", func(rng *rand.Rand) int { return 1 + rng.IntN(600) }},
		{"one frame header at a time", func(rng *rand.Rand) int { return 1 + rng.IntN(9) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			script := frameScript(1, 300)
			want := framerReads(t, script)
			rng := rand.New(rand.NewPCG(3, 4))
			conn := &chunkConn{err: io.EOF}
			for rest := script; len(rest) > 0; {
				n := min(tc.chunk(rng), len(rest))
				conn.chunks = append(conn.chunks, rest[:n])
				rest = rest[n:]
			}
			tr := newTestTransport(conn)
			got, fast, err := readDataFrames(tr)
			sameFrames(t, got, want, err)
			if fast == 0 && tc.name != "one frame header at a time" {
				t.Error("no DATA frame came through the fast path")
			}
			t.Logf("%d frames, %d DATA through the fast path", len(got), fast)
		})
	}
}

// TestBufferedDataTCP: the same over a loopback TCP socket, read with
// raw read(2) as the data plane does, the peer writing in random chunks.
func TestBufferedDataTCP(t *testing.T) {
	t.Parallel()
	a, b := tcpPair(t)
	t.Cleanup(func() { a.Close(); b.Close() })
	script := frameScript(2, 400)
	want := framerReads(t, script)
	go func() {
		rng := rand.New(rand.NewPCG(5, 6))
		for rest := script; len(rest) > 0; {
			n := min(1+rng.IntN(70000), len(rest))
			if _, err := a.Write(rest[:n]); err != nil {
				return
			}
			rest = rest[n:]
		}
		a.Close()
	}()
	b.SetReadDeadline(time.Now().Add(30 * time.Second))
	tr := newTestTransport(b)
	if tr.cr.raw == nil {
		t.Fatal("not reading through RawConn")
	}
	got, fast, err := readDataFrames(tr)
	sameFrames(t, got, want, err)
	if fast == 0 {
		t.Error("no DATA frame came through the fast path")
	}
}

// TestBufferedDataLeavesErrorsToFramer: a DATA frame the Framer rejects is
// not taken by the fast path, so the connection gets the Framer's error,
// whole in the buffer as it is.
func TestBufferedDataLeavesErrorsToFramer(t *testing.T) {
	t.Parallel()
	frame := func(length int, flags http2.Flags, id uint32, payload []byte) []byte {
		h := []byte{byte(length >> 16), byte(length >> 8), byte(length), byte(http2.FrameData), byte(flags), byte(id >> 24), byte(id >> 16), byte(id >> 8), byte(id)}
		return append(h, payload...)
	}
	big := make([]byte, maxFrameSize+1)
	for _, tc := range []struct {
		name  string
		frame []byte
		want  func(error) bool
	}{
		{"stream 0", frame(3, 0, 0, []byte("abc")), isConnError(http2.ErrCodeProtocol)},
		{"padding longer than the payload", frame(3, http2.FlagDataPadded, 1, []byte{3, 'a', 'b'}), isConnError(http2.ErrCodeProtocol)},
		{"padded, no Pad Length", frame(0, http2.FlagDataPadded, 1, nil), func(err error) bool { return err != nil }},
		{"over the frame size", frame(len(big), 0, 1, big), func(err error) bool { return errors.Is(err, http2.ErrFrameTooLarge) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var b bytes.Buffer
			http2.NewFramer(&b, nil).WriteSettings()
			http2.NewFramer(&b, nil).WriteData(1, false, []byte("fine"))
			b.Write(tc.frame)
			tr := newTestTransport(&chunkConn{chunks: [][]byte{b.Bytes()}, err: io.EOF})
			got, fast, err := readDataFrames(tr)
			if len(got) != 2 || fast != 1 {
				t.Errorf("read %d frames, %d through the fast path; want SETTINGS, then the good DATA through it", len(got), fast)
			}
			if !tc.want(err) {
				t.Errorf("error %v, not the Framer's", err)
			}
		})
	}
}

func isConnError(code http2.ErrCode) func(error) bool {
	return func(err error) bool {
		var ce http2.ConnectionError
		return errors.As(err, &ce) && http2.ErrCode(ce) == code
	}
}

// TestBufferedDataNotInHeaderBlock: a DATA frame where a CONTINUATION must
// come is the Framer's to reject (RFC 9113 §6.10), not the fast path's to
// take.
func TestBufferedDataNotInHeaderBlock(t *testing.T) {
	t.Parallel()
	var b bytes.Buffer
	fr := http2.NewFramer(&b, nil)
	fr.WriteSettings()
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0x82}, EndHeaders: false})
	fr.WriteData(1, false, []byte("not a CONTINUATION"))
	tr := newTestTransport(&chunkConn{chunks: [][]byte{b.Bytes()}, err: io.EOF})
	_, fast, err := readDataFrames(tr)
	if fast != 0 {
		t.Errorf("%d DATA frames through the fast path inside a header block, want 0", fast)
	}
	if !isConnError(http2.ErrCodeProtocol)(err) {
		t.Errorf("error %v, want a connection error PROTOCOL_ERROR", err)
	}
}
