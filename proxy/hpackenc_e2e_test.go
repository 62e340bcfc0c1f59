package proxy_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
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

// TestHeaderBlocksUnderLoad relays many concurrent calls over one client
// connection whose metadata the backends echo in response headers and
// trailers: values that repeat (dynamic table hits), values new with each
// call (inserts), and now and then one of 1-3 KiB, which evicts most of a
// 4,096-byte table. The proxy's encoders, one per connection in each
// direction, must keep in step with grpc-go's decoders throughout: every
// echoed value comes back as sent.
func TestHeaderBlocksUnderLoad(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 3})
	client := e.client
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const workers, calls = 16, 60
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range calls {
				want := map[string]string{
					"x-echo-shared":        fmt.Sprintf("shared-%d", i%5),
					"x-echo-unique":        fmt.Sprintf("w%d-call%d", w, i),
					"x-echo-trailer-small": fmt.Sprint(i % 3),
				}
				if i%7 == 3 {
					want["x-echo-big"] = strings.Repeat(fmt.Sprintf("%d-", w), 500+100*(i%20))
				}
				var pairs []string
				for k, v := range want {
					pairs = append(pairs, k, v)
				}
				var hdr, trl metadata.MD
				cctx := metadata.AppendToOutgoingContext(ctx, pairs...)
				if _, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{ResponseSize: 10}, grpc.Header(&hdr), grpc.Trailer(&trl)); err != nil {
					errs <- fmt.Errorf("worker %d call %d: %v", w, i, err)
					return
				}
				for k, v := range want {
					md := hdr
					if strings.HasPrefix(k, "x-echo-trailer-") {
						md = trl
					}
					if got := md.Get(k); len(got) != 1 || got[0] != v {
						errs <- fmt.Errorf("worker %d call %d: %s echoed as %.40q, want %.40q", w, i, k, got, v)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
