package proxy

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"unsafe"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/net/http2/hpack"
)

// decodeBlock decodes one header block with x/net's decoder, which keeps
// its own dynamic table: the reference the encoder must agree with.
func decodeBlock(t *testing.T, d *hpack.Decoder, block []byte) []hpack.HeaderField {
	t.Helper()
	got, err := d.DecodeFull(block)
	if err != nil {
		t.Fatalf("decoding %d bytes (from %.64x): %v", len(block), block, err)
	}
	return got
}

// grpcRequest is a unary call's request headers as grpc-go sends them.
func grpcRequestFields(timeout string) []hpack.HeaderField {
	return []hpack.HeaderField{
		{Name: ":method", Value: "POST"},
		{Name: ":scheme", Value: "http"},
		{Name: ":path", Value: "/grpc.testing.TestService/UnaryCall"},
		{Name: ":authority", Value: "127.0.0.1:24100"},
		{Name: "content-type", Value: "application/grpc"},
		{Name: "user-agent", Value: "grpc-go/1.79.0"},
		{Name: "te", Value: "trailers"},
		{Name: "grpc-timeout", Value: timeout},
	}
}

func TestHpackEncoderStaticTable(t *testing.T) {
	t.Parallel()
	// Every entry of RFC 7541 Appendix A, as x/net's decoder knows it:
	// a lone indexed field (one byte) must decode to the entry.
	d := hpack.NewDecoder(4096, nil)
	e := newHpackEncoder()
	for i := uint64(1); i <= 61; i++ {
		want := decodeBlock(t, d, appendHpackInt(nil, 0x80, 7, i))
		if len(want) != 1 {
			t.Fatalf("static %d: %v", i, want)
		}
		block := e.appendBlock(nil, want)
		if len(block) != 1 {
			t.Errorf("static entry %d %q: encoded in %d bytes, want 1 (an index)", i, want[0].Name+": "+want[0].Value, len(block))
		}
		if got := decodeBlock(t, d, block); !cmp.Equal(got, want) {
			t.Errorf("static entry %d: got %v, want %v", i, got, want)
		}
		// The name alone, with another value: the name's index, the
		// value as a literal.
		other := []hpack.HeaderField{{Name: want[0].Name, Value: "x-other"}}
		block = e.appendBlock(nil, other)
		if got := decodeBlock(t, d, block); !cmp.Equal(got, other) {
			t.Errorf("static name %d: got %v, want %v", i, got, other)
		}
		if block[0]&0x3f == 0 && block[0]&0xc0 == 0x40 {
			t.Errorf("static name %d %q: sent as a new name (%x)", i, want[0].Name, block)
		}
	}
}

func TestHpackEncoderSteadyState(t *testing.T) {
	t.Parallel()
	d := hpack.NewDecoder(4096, nil)
	e := newHpackEncoder()
	resp := []hpack.HeaderField{{Name: ":status", Value: "200"}, {Name: "content-type", Value: "application/grpc"}, {Name: "x-backend", Value: "b1"}}
	trailers := []hpack.HeaderField{{Name: "grpc-status", Value: "0"}, {Name: "grpc-message", Value: ""}}
	var sizes []int
	for call := range 500 {
		req := grpcRequestFields(fmt.Sprintf("%dm", 30000-call))
		for _, fields := range [][]hpack.HeaderField{req, resp, trailers} {
			block := e.appendBlock(nil, fields)
			if got := decodeBlock(t, d, block); !cmp.Equal(got, fields) {
				t.Fatalf("call %d: got %v, want %v", call, got, fields)
			}
			if call > 0 {
				sizes = append(sizes, len(block))
			}
		}
	}
	// After the first call every field but grpc-timeout is one byte: an
	// index into the static or the dynamic table. grpc-timeout is a
	// literal of its static-less name (1 + 1 + 12 bytes) and its value.
	for i, n := range sizes {
		want := []int{7 + 1 + 1 + 12 + 1 + 6, 3, 2}[i%3]
		if n > want {
			t.Fatalf("block %d of the steady state: %d bytes, want at most %d", i, n, want)
		}
	}
	if e.count > 20 {
		t.Errorf("%d table entries after 500 calls of the same fields, want them inserted once", e.count)
	}
}

func TestHpackEncoderSensitive(t *testing.T) {
	t.Parallel()
	d := hpack.NewDecoder(4096, nil)
	e := newHpackEncoder()
	fields := []hpack.HeaderField{
		{Name: "authorization", Value: "secret", Sensitive: true},
		{Name: "x-token", Value: "secret", Sensitive: true},
		{Name: ":method", Value: "POST", Sensitive: true}, // a static entry, but never indexed
	}
	for range 3 {
		block := e.appendBlock(nil, fields)
		if got := decodeBlock(t, d, block); !cmp.Equal(got, fields) {
			t.Fatalf("got %v, want %v", got, fields)
		}
	}
	if e.count != 0 {
		t.Errorf("%d never-indexed fields in the dynamic table", e.count)
	}
}

// TestHpackEncoderRandom encodes random header lists, with the peer's
// table size lowered now and then, and decodes them with x/net's decoder,
// which fails on an index its table does not hold and on a size update
// missing or above what it allows.
func TestHpackEncoderRandom(t *testing.T) {
	t.Parallel()
	names := []string{":method", ":path", ":authority", ":status", "content-type", "te", "grpc-timeout",
		"grpc-status", "grpc-message", "x-a", "x-b", "x-c", "user-agent", "accept-encoding", "cookie"}
	for seed := range uint64(20) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 7))
			e := newHpackEncoder()
			d := hpack.NewDecoder(4096, nil)
			for block := range 400 {
				lowered := false
				if rng.IntN(40) == 0 {
					// The peer changes SETTINGS_HEADER_TABLE_SIZE: its
					// decoder allows no more from now on, and our
					// encoder hears of it before its next block.
					v := uint32(rng.IntN(5000))
					d.SetAllowedMaxDynamicTableSize(v)
					lowered = v < e.maxSize
					e.setMaxSizeLimit(v)
				}
				var fields []hpack.HeaderField
				for range rng.IntN(12) {
					f := hpack.HeaderField{Name: names[rng.IntN(len(names))]}
					switch rng.IntN(6) {
					case 0:
						f.Value = strings.Repeat("v", rng.IntN(4200)) // some larger than the table
					case 1:
						f.Value = ""
					case 2:
						f.Value = fmt.Sprint(rng.IntN(1000))
					default:
						f.Value = fmt.Sprint(rng.IntN(8))
					}
					f.Sensitive = rng.IntN(20) == 0
					fields = append(fields, f)
				}
				b := e.appendBlock(nil, fields)
				if lowered && (len(b) == 0 || b[0]&0xe0 != 0x20) {
					t.Fatalf("block %d after the table was lowered to %d: no dynamic table size update first (%x)", block, e.maxSize, b)
				}
				got := decodeBlock(t, d, b)
				if len(fields) == 0 {
					fields = nil
				}
				if !cmp.Equal(got, fields) {
					t.Fatalf("block %d: got %v, want %v", block, got, fields)
				}
				if e.size > e.maxSize {
					t.Fatalf("block %d: table size %d over its maximum %d", block, e.size, e.maxSize)
				}
				checkEncoderBooks(t, e)
			}
		})
	}
}

// checkEncoderBooks checks that the encoder's books agree with each other:
// the ring holds the table's entries and their sizes, and the cache only
// entries the table holds, each at the slot its ring entry names.
func checkEncoderBooks(t *testing.T, e *hpackEncoder) {
	t.Helper()
	if n := len(e.ring); n&(n-1) != 0 || n > encMaxEntries || e.count > uint32(n) {
		t.Fatalf("ring of %d for %d entries: want a power of two, at most %d, holding them", n, e.count, encMaxEntries)
	}
	if n := len(e.slots); n != 0 && n != encFirstSlots && n != encSlots {
		t.Fatalf("cache of %d slots", n)
	}
	var size uint32
	for i := range e.count {
		size += uint32(e.ring[(e.head+i)&uint32(len(e.ring)-1)].size)
	}
	if size != e.size {
		t.Fatalf("ring entries add up to %d bytes, the table's books say %d", size, e.size)
	}
	first := e.next - e.count
	for i, c := range e.slots {
		if c.id == 0 {
			continue
		}
		if c.id < first || c.id >= e.next {
			t.Fatalf("slot %d caches entry %d, not in the table (%d..%d)", i, c.id, first, e.next-1)
		}
		r := e.ring[(e.head+c.id-first)&uint32(len(e.ring)-1)]
		if int(r.slot) != i || int(r.size) != len(c.name)+len(c.value)+32 {
			t.Fatalf("slot %d caches entry %d (%d bytes), whose ring entry says slot %d, %d bytes", i, c.id, len(c.name)+len(c.value)+32, r.slot, r.size)
		}
	}
}

// TestHpackEncoderSmall: an encoder that carries gRPC responses, as a
// client connection's does, keeps its first 8 cache slots and a short
// ring: about 400 bytes for as long as the connection lives, idle or not,
// where arrays of the largest sizes took 2 KiB.
func TestHpackEncoderSmall(t *testing.T) {
	e := newHpackEncoder()
	d := hpack.NewDecoder(4096, nil)
	headers := []hpack.HeaderField{{Name: ":status", Value: "200"}, {Name: "content-type", Value: "application/grpc"}}
	for i := range 1000 {
		trailers := []hpack.HeaderField{{Name: "grpc-status", Value: fmt.Sprint([]int{0, 0, 0, 5, 14}[i%5])}, {Name: "grpc-message", Value: ""}}
		for _, fields := range [][]hpack.HeaderField{headers, trailers} {
			if got := decodeBlock(t, d, e.appendBlock(nil, fields)); !cmp.Equal(got, fields) {
				t.Fatalf("call %d: got %v, want %v", i, got, fields)
			}
		}
		checkEncoderBooks(t, e)
	}
	held := int(unsafe.Sizeof(*e)) + cap(e.ring)*int(unsafe.Sizeof(encEntry{})) + cap(e.slots)*int(unsafe.Sizeof(encSlot{}))
	if len(e.slots) != encFirstSlots || held > 512 {
		t.Errorf("after 1,000 responses: %d cache slots, %d ring entries, %d bytes; want %d slots, at most 512 bytes", len(e.slots), len(e.ring), held, encFirstSlots)
	}
}

// TestHpackEncoderGrows: many distinct fields grow the ring to hold them
// all and the cache to its full size, and the books stay right: x/net's
// decoder agrees with the blocks, and every field the cache holds after
// the growth is sent as an index into the table.
func TestHpackEncoderGrows(t *testing.T) {
	e := newHpackEncoder()
	d := hpack.NewDecoder(4096, nil)
	var fields []hpack.HeaderField
	for i := range 100 {
		fields = append(fields, hpack.HeaderField{Name: fmt.Sprintf("x-%c%c", 'a'+i%26, 'a'+i/26), Value: fmt.Sprint(i)})
	}
	if got := decodeBlock(t, d, e.appendBlock(nil, fields)); !cmp.Equal(got, fields) {
		t.Fatalf("got %v, want %v", got, fields)
	}
	checkEncoderBooks(t, e)
	if e.count != 100 || len(e.ring) != encMaxEntries || len(e.slots) != encSlots {
		t.Fatalf("%d entries, ring of %d, %d slots; want 100, %d, %d", e.count, len(e.ring), len(e.slots), encMaxEntries, encSlots)
	}
	var cached []hpack.HeaderField
	for _, c := range e.slots {
		if c.id != 0 {
			cached = append(cached, hpack.HeaderField{Name: c.name, Value: c.value})
		}
	}
	if len(cached) < encSlots/2 {
		t.Fatalf("%d of the %d slots hold an entry", len(cached), encSlots)
	}
	for _, f := range cached {
		b := e.appendBlock(nil, []hpack.HeaderField{f})
		if len(b) == 0 || b[0]&0x80 == 0 {
			t.Fatalf("cached %v sent as %x, not as an index", f, b)
		}
		if got := decodeBlock(t, d, b); !cmp.Equal(got, []hpack.HeaderField{f}) {
			t.Fatalf("got %v, want %v", got, f)
		}
	}
	checkEncoderBooks(t, e)
}

func BenchmarkHpackEncoder(b *testing.B) {
	resp := []hpack.HeaderField{{Name: ":status", Value: "200"}, {Name: "content-type", Value: "application/grpc"}, {Name: "x-backend", Value: "b1"}}
	trailers := []hpack.HeaderField{{Name: "grpc-status", Value: "0"}, {Name: "grpc-message", Value: ""}}
	reqs := make([][]hpack.HeaderField, 64)
	for i := range reqs {
		reqs[i] = grpcRequestFields(fmt.Sprintf("%du", 29999000-i*37))
	}
	b.Run("streamlb", func(b *testing.B) {
		e := newHpackEncoder()
		var buf []byte
		for i := 0; b.Loop(); i++ {
			buf = e.appendBlock(buf[:0], reqs[i%len(reqs)])
			buf = e.appendBlock(buf[:0], resp)
			buf = e.appendBlock(buf[:0], trailers)
		}
	})
	b.Run("x-net", func(b *testing.B) {
		var w strings.Builder
		e := hpack.NewEncoder(&w)
		for i := 0; b.Loop(); i++ {
			for _, fields := range [][]hpack.HeaderField{reqs[i%len(reqs)], resp, trailers} {
				w.Reset()
				for _, f := range fields {
					e.WriteField(f)
				}
			}
		}
	})
}

// FuzzHpackEncoder reads a script from the input: header lists (names
// from a small set, so that fields repeat; values from the input) and
// now and then a new table size from the peer. Every block must decode,
// with x/net's decoder held to the sizes the peer allowed, to the list
// that was encoded.
func FuzzHpackEncoder(f *testing.F) {
	f.Add([]byte("\x03\x01a\x02bb\x05ccccc\xff\x10\x00\x04\x01a\x02bb"))
	f.Add([]byte("\xfe\x00\x00\x02\x01x\x01x\x01x"))
	f.Add(bytes.Repeat([]byte{7, 200, 'v'}, 50))
	names := []string{":path", ":authority", "content-type", "grpc-timeout", "grpc-status", "x-a", "x-b", "cookie", "te", ":status"}
	f.Fuzz(func(t *testing.T, in []byte) {
		e := newHpackEncoder()
		d := hpack.NewDecoder(4096, nil)
		next := func() (byte, bool) {
			if len(in) == 0 {
				return 0, false
			}
			b := in[0]
			in = in[1:]
			return b, true
		}
		for blocks := 0; len(in) > 0 && blocks < 200; blocks++ {
			n, _ := next()
			if n >= 0xfe { // the peer's SETTINGS_HEADER_TABLE_SIZE
				hi, _ := next()
				lo, _ := next()
				v := uint32(hi)<<8 | uint32(lo)
				if n == 0xff {
					v <<= 2
				}
				d.SetAllowedMaxDynamicTableSize(v)
				e.setMaxSizeLimit(v)
				continue
			}
			var fields []hpack.HeaderField
			for range n % 16 {
				k, ok := next()
				if !ok {
					break
				}
				l, _ := next()
				v := make([]byte, int(l)*int(k>>4+1))
				for i := range v {
					v[i] = 'a' + byte(i+int(k))%26
				}
				fields = append(fields, hpack.HeaderField{Name: names[int(k)%len(names)], Value: string(v), Sensitive: k&0x80 != 0 && k&1 != 0})
			}
			b := e.appendBlock(nil, fields)
			got, err := d.DecodeFull(b)
			if err != nil {
				t.Fatalf("block %d (%d bytes, from %.64x): %v", blocks, len(b), b, err)
			}
			if len(fields) == 0 {
				fields = nil
			}
			if !cmp.Equal(got, fields) {
				t.Fatalf("block %d: got %v, want %v", blocks, got, fields)
			}
			checkEncoderBooks(t, e)
			if e.size > e.maxSize {
				t.Fatalf("table size %d over its maximum %d", e.size, e.maxSize)
			}
		}
	})
}
