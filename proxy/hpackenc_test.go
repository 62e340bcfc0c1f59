package proxy

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"golang.org/x/net/http2/hpack"
)

// TestHeaderEncoderMemo encodes a long run of gRPC-like header blocks with
// headerEncoder and decodes every block with x/net's Decoder, as the peer
// would: each must decode to exactly the fields given, whatever the memo
// wrote from its own bytes. The run mixes the blocks a connection sees
// (requests with changing grpc-timeout, responses and trailers, errors
// with messages, new paths, sensitive fields, long blocks) with changes of
// the peer's table size, and checks that the memo is used and that
// grpc-timeout never enters the table.
func TestHeaderEncoderMemo(t *testing.T) {
	var hw switchWriter
	var buf bytes.Buffer
	hw.w = &buf
	e := newHeaderEncoder(&hw)
	dec := hpack.NewDecoder(4096, nil)
	rng := rand.New(rand.NewPCG(1, 2))

	request := func(path string, timeout int) []hpack.HeaderField {
		return []hpack.HeaderField{
			{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "http"},
			{Name: ":path", Value: path}, {Name: ":authority", Value: "127.0.0.1:7000"},
			{Name: "content-type", Value: "application/grpc"}, {Name: "user-agent", Value: "grpc-go/1.77.0"},
			{Name: "te", Value: "trailers"}, {Name: "grpc-timeout", Value: fmt.Sprintf("%du", timeout)},
		}
	}
	response := []hpack.HeaderField{{Name: ":status", Value: "200"}, {Name: "content-type", Value: "application/grpc"}}
	trailers := func(code int, msg string) []hpack.HeaderField {
		f := []hpack.HeaderField{{Name: "grpc-status", Value: fmt.Sprint(code)}}
		if msg != "" {
			f = append(f, hpack.HeaderField{Name: "grpc-message", Value: msg})
		}
		return f
	}
	long := func(n int) []hpack.HeaderField {
		var f []hpack.HeaderField
		for i := range n {
			f = append(f, hpack.HeaderField{Name: fmt.Sprintf("x-h%d", i), Value: fmt.Sprint(rng.IntN(3))})
		}
		return f
	}

	var memoBytes, blocks int
	for i := range 20000 {
		var fields []hpack.HeaderField
		switch r := rng.IntN(100); {
		case r < 40:
			path := "/grpc.testing.TestService/UnaryCall"
			if rng.IntN(20) == 0 {
				path = fmt.Sprintf("/svc/M%d", rng.IntN(50))
			}
			fields = request(path, 1+rng.IntN(30_000_000))
		case r < 70:
			fields = response
		case r < 85:
			fields = trailers(0, "")
		case r < 90:
			// Custom trailers, in the order a map gives them.
			fields = append(trailers(0, ""), hpack.HeaderField{Name: "x-a", Value: "1"}, hpack.HeaderField{Name: "x-b", Value: "2"})
			if rng.IntN(2) == 0 {
				fields[1], fields[2] = fields[2], fields[1]
			}
		case r < 95:
			fields = trailers(1+rng.IntN(16), fmt.Sprintf("failed %d", rng.IntN(100)))
		case r < 97:
			fields = append(request("/a/b", 5), hpack.HeaderField{Name: "authorization", Value: "secret", Sensitive: true})
		case r < 99:
			fields = long(1 + rng.IntN(24))
		default:
			// The peer changes SETTINGS_HEADER_TABLE_SIZE; the decoder
			// learns it from the update the encoder must send first.
			size := uint32([]int{0, 64, 256, 4096}[rng.IntN(4)])
			e.setMaxTableSizeLimit(size)
			dec.SetAllowedMaxDynamicTableSize(size)
			fields = response
		}
		buf.Reset()
		hits := testMemoHits(e, fields)
		if err := e.encode(&buf, fields); err != nil {
			t.Fatal(err)
		}
		blocks++
		memoBytes += hits
		got, err := dec.DecodeFull(buf.Bytes())
		if err != nil {
			t.Fatalf("block %d (%v): decode: %v", i, fields, err)
		}
		for j := range got {
			got[j].Sensitive = false
		}
		want := slices.Clone(fields)
		for j := range want {
			want[j].Sensitive = false
		}
		if !slices.Equal(got, want) {
			t.Fatalf("block %d: decoded\n%v\nwant\n%v", i, got, want)
		}
	}
	// The mix changes the table in about one block of ten, which voids
	// the memo each time; steady traffic is below.
	t.Logf("%d fields written from the memo in %d blocks", memoBytes, blocks)
	if memoBytes == 0 {
		t.Error("no field was written from the memo")
	}

	// Steady gRPC traffic on a connection toward clients: responses and
	// trailers alternate; after the first two calls every field comes
	// from the memo.
	e = newHeaderEncoder(&hw)
	dec = hpack.NewDecoder(4096, nil)
	for k := range 10 {
		for _, fields := range [][]hpack.HeaderField{response, trailers(0, "")} {
			hits := testMemoHits(e, fields)
			buf.Reset()
			if err := e.encode(&buf, fields); err != nil {
				t.Fatal(err)
			}
			if _, err := dec.DecodeFull(buf.Bytes()); err != nil {
				t.Fatal(err)
			}
			if k >= 2 && hits != len(fields) {
				t.Errorf("call %d: %d of %d fields from the memo", k, hits, len(fields))
			}
		}
	}

	// grpc-timeout is written without indexing: after many requests with
	// distinct timeouts, a request whose other fields are in the table
	// still decodes, and the table holds no grpc-timeout entry (a decoder
	// with a tiny table would otherwise have evicted the rest).
	var fresh bytes.Buffer
	hw.w = &fresh
	e2 := newHeaderEncoder(&hw)
	d2 := hpack.NewDecoder(4096, func(f hpack.HeaderField) {})
	for k := range 100 {
		fresh.Reset()
		if err := e2.encode(&fresh, request("/p/q", k+1)); err != nil {
			t.Fatal(err)
		}
		if _, err := d2.Write(fresh.Bytes()); err != nil {
			t.Fatal(err)
		}
		// The last field is grpc-timeout: a literal without indexing
		// with a literal name starts with byte 0x00.
		if k > 0 && !bytes.Contains(fresh.Bytes(), []byte{0x00}) {
			t.Fatalf("request %d: no literal without indexing in % x", k, fresh.Bytes())
		}
	}
	fresh.Reset()
	if err := e2.encode(&fresh, request("/p/q", 7)); err != nil {
		t.Fatal(err)
	}
	// 7 one-byte indexes, and grpc-timeout: 0x00, the name (9 bytes
	// Huffman-coded) and "7u" with their lengths.
	if n := fresh.Len(); n > 7+1+10+3 {
		t.Errorf("a repeated request took %d bytes (% x); want its 7 stable fields as indexes and only grpc-timeout literal", n, fresh.Bytes())
	}
	if hits := testMemoHits(e2, request("/p/q", 8)); hits != 7 {
		t.Errorf("memo has %d of the request's 7 stable fields", hits)
	}
}

// testMemoHits is how many of fields e would write from its memo now.
func testMemoHits(e *headerEncoder, fields []hpack.HeaderField) int {
	if e.sizeChanged || e.memoGen != e.gen {
		return 0
	}
	hits := 0
	for j := range fields {
		if fields[j].Sensitive {
			continue
		}
		for k := range e.memo {
			if e.memo[k].name == fields[j].Name && e.memo[k].value == fields[j].Value {
				hits++
				break
			}
		}
	}
	return hits
}
