package proxy

import (
	"encoding/binary"
	"slices"
	"testing"
)

// msgs builds length-prefixed gRPC messages of the given body sizes.
func msgs(sizes ...int) []byte {
	var out []byte
	for _, n := range sizes {
		var p [5]byte
		binary.BigEndian.PutUint32(p[1:], uint32(n))
		out = append(out, p[:]...)
		out = append(out, make([]byte, n)...)
	}
	return out
}

// partialOf is the reference: the bytes of the last, incomplete message of
// b, parsed in one piece.
func partialOf(b []byte) int64 {
	for {
		if len(b) < 5 {
			return int64(len(b))
		}
		n := uint64(binary.BigEndian.Uint32(b[1:5]))
		if uint64(len(b)-5) < n {
			return int64(len(b))
		}
		b = b[5+n:]
	}
}

func TestMsgCursor(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		stream []byte
		splits []int // frame boundaries
		want   int64
	}{
		{name: "empty", want: 0},
		{name: "one whole message", stream: msgs(10), splits: []int{15}, want: 0},
		{name: "empty message", stream: msgs(0), want: 0},
		{name: "prefix split", stream: msgs(3, 4), splits: []int{2, 3, 9}, want: 0},
		{name: "cut in the prefix", stream: msgs(10, 8)[:18], want: 3},
		{name: "cut in the body", stream: msgs(10, 8)[:20], want: 5},
		{name: "many small frames", stream: msgs(1, 2, 3, 100)[:50], splits: []int{1, 2, 3, 4, 5, 6, 7, 30}, want: 50 - 21},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var m msgCursor
			prev := 0
			for _, s := range append(tc.splits, len(tc.stream)) {
				s = min(s, len(tc.stream))
				m.advance(tc.stream[prev:s])
				prev = s
			}
			if m.partial != tc.want {
				t.Errorf("partial: got %d, want %d", m.partial, tc.want)
			}
		})
	}
}

// FuzzMsgCursor: the cursor, fed in frames, agrees with a parse of the
// whole payload, whatever the bytes.
func FuzzMsgCursor(f *testing.F) {
	f.Add(msgs(10, 8)[:20], uint8(3))
	f.Add(msgs(1, 2, 3), uint8(1))
	f.Add([]byte{0, 0xff, 0xff, 0xff, 0xff, 1, 2}, uint8(2))
	f.Fuzz(func(t *testing.T, b []byte, step uint8) {
		var m msgCursor
		st := int(step%16) + 1
		for i := 0; i < len(b); i += st {
			m.advance(b[i:min(i+st, len(b))])
		}
		if got, want := m.partial, partialOf(b); got != want {
			t.Errorf("partial: got %d, want %d", got, want)
		}
	})
}

// TestCutQueued: cutQueuedLocked keeps, of a response queued in frames of
// any size and partly written, exactly the rest of the message being
// written, so the client's parser never finds the stream ending inside a
// message; when it cannot tell where that message ends it says so.
func TestCutQueued(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		sizes  []int // message body sizes
		splits []int // frame boundaries
		cut    int   // bytes of the payload queued (the tail may be incomplete)
	}{
		{name: "whole messages, one frame each", sizes: []int{100, 100, 100}, splits: []int{105, 210}},
		{name: "messages across buffers", sizes: []int{10000, 10000, 10000, 10000}, splits: []int{10005, 20010, 30015}},
		{name: "many in one buffer", sizes: []int{10, 0, 20, 3, 7, 100, 1}},
		{name: "prefix split across frames", sizes: []int{3, 4000, 5}, splits: []int{2, 3, 9, 10, 12, 2000, 4010}},
		{name: "big message", sizes: []int{50000, 10}, splits: []int{16000, 32000, 48000}},
		{name: "incomplete tail", sizes: []int{1000, 20000}, splits: []int{1005, 9000}, cut: 15000},
	} {
		payload := msgs(tc.sizes...)
		if tc.cut > 0 {
			payload = payload[:tc.cut]
		}
		var bounds []int // where messages end
		for i, n := 0, 0; i < len(tc.sizes); i++ {
			n += 5 + tc.sizes[i]
			bounds = append(bounds, n)
		}
		for w := 0; w <= len(payload); w += 1 + w/7 {
			c := &serverConn{}
			s := &stream{}
			prev := 0
			for _, sp := range append(tc.splits, len(payload)) {
				sp = min(sp, len(payload))
				if sp > prev {
					s.pushDownData(payload[prev:sp], false)
				}
				prev = sp
			}
			// The writer took w bytes.
			q := &s.down
			for left := w; left > 0; {
				it := &q.items[q.head]
				if k := it.n - it.off; k <= left {
					left -= k
					putBuf(it.buf)
					*it = outItem{}
					q.head++
					continue
				}
				it.off += left
				left = 0
			}
			headUnknown := !q.empty() && q.items[q.head].msgAt == 0
			ok := c.cutQueuedLocked(s)
			want := -1 // the end of the message at w
			for _, b := range bounds {
				if b >= w {
					want = b
					break
				}
			}
			if w == 0 || slices.Contains(bounds, w) {
				want = w
			}
			if !ok {
				if want <= len(payload) && !headUnknown {
					t.Errorf("%s, %d bytes written: no cut, want one at %d", tc.name, w, want)
				}
				continue
			}
			var left int
			for i := q.head; i < len(q.items); i++ {
				left += q.items[i].n - q.items[i].off
			}
			if w+left != want {
				t.Errorf("%s, %d bytes written: %d bytes left queued, want %d (the message ends at %d)", tc.name, w, left, want-w, want)
			}
		}
	}
}

func TestMsgCursorNextAt(t *testing.T) {
	t.Parallel()
	stream := msgs(3, 300, 0, 70000)
	starts := []int{0, 8, 313, 318}
	for at := 0; at < len(stream); at++ {
		var m msgCursor
		m.advance(stream[:at])
		want := len(stream) // none after at
		for _, s := range starts {
			if s >= at {
				want = s
				break
			}
		}
		for end := at; end <= min(len(stream), at+6); end++ {
			got := m.nextAt(stream[at:end])
			if got == 0 {
				if end-at >= 4 || m.prefix == 0 || m.prefix == 5 {
					t.Errorf("at %d, %d bytes: not known", at, end-at)
				}
				continue
			}
			if int(got)-1 != want-at {
				t.Errorf("at %d: next message at +%d, want +%d", at, int(got)-1, want-at)
			}
		}
	}
}
