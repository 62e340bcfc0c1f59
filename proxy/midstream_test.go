package proxy

import (
	"encoding/binary"
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
