package proxy

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"testing"
)

// holdRef is the reference for what the hold-back keeps of a payload b
// received so far: the bytes of its last, incomplete message when that
// message may be held (its prefix is not complete yet, or its length is at
// most bound), else nothing. It parses b in one piece.
func holdRef(b []byte, bound uint32) []byte {
	for {
		if len(b) < 5 {
			return b // at a boundary (empty) or inside a prefix
		}
		n := binary.BigEndian.Uint32(b[1:5])
		if uint64(len(b)-5) < uint64(n) {
			if n > bound {
				return nil
			}
			return b
		}
		b = b[5+uint64(n):]
	}
}

// checkHold feeds b to a holdCursor in frames of the given sizes, doing
// with scan's answer what holdLocked does (without flow control), and
// checks after every frame that what went on and what is held are the
// payload so far, split where holdRef says.
func checkHold(t *testing.T, b []byte, frames []int, bound uint32) {
	t.Helper()
	var c holdCursor
	var fwd, held []byte
	at := 0
	for _, n := range frames {
		n = min(n, len(b)-at)
		if n <= 0 {
			break
		}
		p := b[at : at+n]
		at += n
		switch start := c.scan(p, bound); {
		case start == len(p):
			fwd = append(append(fwd, held...), p...)
			held = nil
		case start < 0:
			held = append(held, p...)
		default:
			if len(held) > 0 && start == 0 {
				t.Fatalf("after %d bytes: a held message completed at offset 0 of the frame", at)
			}
			fwd = append(append(fwd, held...), p[:start]...)
			held = append([]byte(nil), p[start:]...)
		}
		want := holdRef(b[:at], bound)
		if !bytes.Equal(held, want) || !bytes.Equal(append(append([]byte(nil), fwd...), held...), b[:at]) {
			t.Fatalf("after %d bytes in frames %v (bound %d): forwarded %d and held %d bytes, want %d held", at, frames, bound, len(fwd), len(held), len(want))
		}
	}
}

// TestHoldCursor: the hold-back's cursor against holdRef, on chosen and
// on random payloads and frames.
func TestHoldCursor(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		stream []byte
		frames []int
		bound  uint32
	}{
		{name: "one whole message", stream: msgs(10), frames: []int{15}, bound: 64},
		{name: "empty messages", stream: msgs(0, 0, 0), frames: []int{5, 10}, bound: 64},
		{name: "prefix split byte by byte", stream: msgs(3, 4), frames: []int{1, 1, 1, 1, 1, 1, 100}, bound: 64},
		{name: "cut in the prefix", stream: msgs(10, 8)[:18], frames: []int{18}, bound: 64},
		{name: "cut in the body", stream: msgs(10, 8)[:20], frames: []int{12, 8}, bound: 64},
		{name: "over the bound", stream: msgs(10, 100, 3), frames: []int{20, 20, 20, 100}, bound: 64},
		{name: "at the bound", stream: msgs(64, 1), frames: []int{30, 30, 30}, bound: 64},
		{name: "length 2^32-1", stream: []byte{0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3}, frames: []int{3, 3, 3}, bound: 1 << 31},
	} {
		t.Run(tc.name, func(t *testing.T) { checkHold(t, tc.stream, tc.frames, tc.bound) })
	}
	// Random messages in random frames, bounded and seeded.
	rng := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		var sizes []int
		for range 1 + rng.IntN(6) {
			sizes = append(sizes, rng.IntN(40))
		}
		b := msgs(sizes...)
		b = b[:len(b)-rng.IntN(min(len(b), 8))]
		var frames []int
		for n := 0; n < len(b); {
			f := 1 + rng.IntN(20)
			frames = append(frames, f)
			n += f
		}
		checkHold(t, b, frames, uint32(rng.IntN(50)))
	}
}

// FuzzHoldCursor: the hold-back's cursor, fed in frames, holds what a
// parse of the whole payload says, whatever the bytes.
func FuzzHoldCursor(f *testing.F) {
	f.Add(msgs(10, 8)[:20], uint8(3), uint32(64))
	f.Add(msgs(1, 2, 3), uint8(1), uint32(2))
	f.Add([]byte{0, 0xff, 0xff, 0xff, 0xff, 1, 2}, uint8(2), uint32(1<<31))
	f.Fuzz(func(t *testing.T, b []byte, step uint8, bound uint32) {
		st := int(step%16) + 1
		var frames []int
		for n := 0; n < len(b); n += st {
			frames = append(frames, st)
		}
		checkHold(t, b, frames, bound)
	})
}
