package proxy_test

import (
	"fmt"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// TestClientHeaderTableSize: a client that sets SETTINGS_HEADER_TABLE_SIZE
// gets header blocks its decoder can read, with its table no larger than
// that (RFC 9113 §6.5.2, RFC 7541 §4.2): a smaller table is announced by a
// dynamic table size update at the start of the first block, and no block
// refers to an entry such a table could not hold. The test's decoder has
// the client's table size from the start, so an encoder that still
// indexed into 4,096 bytes would send indices it cannot resolve.
func TestClientHeaderTableSize(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2})
	for _, tc := range []struct {
		name   string
		size   uint32
		update []byte // the first response block's first bytes; nil: no update
	}{
		{name: "zero", size: 0, update: []byte{0x20}},
		{name: "64 bytes", size: 64, update: []byte{0x3f, 64 - 31}},
		{name: "larger than the default", size: 1 << 16},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRawPreface(t, e.addr)
			r.fr.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: tc.size})
			r.fr.ReadMetaHeaders = nil // the blocks are decoded here
			dec := hpack.NewDecoder(tc.size, nil)
			first := true
			backends := map[string]bool{}
			for call := range 8 {
				id := uint32(2*call + 1)
				r.headers(id, "/grpc.testing.TestService/UnaryCall", false)
				r.fr.WriteData(id, true, grpcMsg(&testgrpc.SimpleRequest{ResponseSize: 10}))
				var blocks [][]hpack.HeaderField
				for ended := false; !ended; {
					h, ok := r.next(func(f http2.Frame) bool {
						_, ok := f.(*http2.HeadersFrame)
						_, rst := f.(*http2.RSTStreamFrame)
						return ok || rst
					}).(*http2.HeadersFrame)
					if !ok {
						t.Fatalf("call %d: stream reset", call)
					}
					if !h.HeadersEnded() {
						t.Fatal("a small header block sent with CONTINUATION frames")
					}
					block := h.HeaderBlockFragment()
					if first {
						first = false
						if tc.update == nil && len(block) > 0 && block[0]&0xe0 == 0x20 {
							t.Errorf("first block %x: a table size update, want none", block)
						}
						if tc.update != nil && (len(block) < len(tc.update) || string(block[:len(tc.update)]) != string(tc.update)) {
							t.Errorf("first block %x: want it to start with the size update %x", block, tc.update)
						}
					}
					fields, err := dec.DecodeFull(block)
					if err != nil {
						t.Fatalf("call %d: decoding the proxy's block %x: %v", call, block, err)
					}
					blocks = append(blocks, fields)
					ended = h.StreamEnded()
				}
				got := fmt.Sprint(blocks)
				if len(blocks) != 2 || len(blocks[0]) == 0 || blocks[0][0] != (hpack.HeaderField{Name: ":status", Value: "200"}) {
					t.Fatalf("call %d: blocks %s, want response headers and trailers", call, got)
				}
				status := ""
				for _, f := range blocks[1] {
					if f.Name == "grpc-status" {
						status = f.Value
					}
				}
				for _, f := range blocks[0] {
					if f.Name == "x-backend" {
						backends[f.Value] = true
					}
				}
				if status != "0" {
					t.Fatalf("call %d: trailers %v, want grpc-status 0", call, blocks[1])
				}
			}
			if len(backends) != 2 {
				t.Errorf("calls answered by %v, want both backends (their x-backend values differ)", backends)
			}
		})
	}
}
