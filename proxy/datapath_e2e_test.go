package proxy_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// dataFrames writes msg as DATA frames on stream id of random sizes up to
// the 16 KiB frame limit, about a third of them padded (some with only
// padding), then, if endEmpty, an empty DATA frame with END_STREAM.
func dataFrames(rng *rand.Rand, id uint32, msg []byte, endEmpty bool) []byte {
	var b bytes.Buffer
	fr := http2.NewFramer(&b, nil)
	for len(msg) > 0 {
		n := min(len(msg), 1+rng.IntN(16384))
		if rng.IntN(3) == 0 {
			n = min(n, 16384-256)
			if rng.IntN(8) == 0 {
				n = 0 // padding only
			}
			fr.WriteDataPadded(id, false, msg[:n], make([]byte, rng.IntN(256)))
		} else {
			fr.WriteData(id, false, msg[:n])
		}
		msg = msg[n:]
	}
	if endEmpty {
		fr.WriteData(id, true, nil)
	}
	return b.Bytes()
}

// writeChunks writes b to nc in writes of random sizes, so that the
// reader's fills end anywhere: in frame headers, in padding, in the
// middle of payloads.
func writeChunks(rng *rand.Rand, nc net.Conn, b []byte) error {
	for len(b) > 0 {
		n := min(len(b), 1+rng.IntN(24000))
		if rng.IntN(4) == 0 {
			n = min(len(b), 1+rng.IntN(12))
		}
		if _, err := nc.Write(b[:n]); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// TestPaddedSplitDataFromBackend: a backend's response in DATA frames of
// every size, padded or not, some with padding only, its bytes arriving
// at the proxy in writes that end anywhere, reaches a grpc-go client
// byte for byte, for messages larger than the proxy's read buffer.
func TestPaddedSplitDataFromBackend(t *testing.T) {
	verifyNoLeaks(t)
	for _, size := range []int{100, 20000, 200 << 10} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			msg := grpcMsg(&testgrpc.SimpleResponse{Payload: &testgrpc.Payload{Body: testserver.PayloadBody(size)}})
			raw := rawBackend(t, func(nc net.Conn) {
				s, err := acceptH2(nc)
				if err != nil || s.hello() != nil {
					return
				}
				rng := rand.New(rand.NewPCG(uint64(size), 1))
				s.serve(func(f http2.Frame) bool {
					h, ok := f.(*http2.HeadersFrame)
					if !ok {
						return true
					}
					var b bytes.Buffer
					fr := http2.NewFramer(&b, nil)
					var hb bytes.Buffer
					enc := hpack.NewEncoder(&hb)
					enc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
					enc.WriteField(hpack.HeaderField{Name: "content-type", Value: "application/grpc"})
					fr.WriteHeaders(http2.HeadersFrameParam{StreamID: h.StreamID, BlockFragment: hb.Bytes(), EndHeaders: true})
					b.Write(dataFrames(rng, h.StreamID, msg, false))
					hb.Reset()
					enc.WriteField(hpack.HeaderField{Name: "grpc-status", Value: "0"})
					fr.WriteHeaders(http2.HeadersFrameParam{StreamID: h.StreamID, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: true})
					return writeChunks(rng, nc, b.Bytes()) == nil
				})
			})
			_, client := twoBackendProxy(t, raw, proxy.Config{BackendStreamWindow: 1 << 20})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			for i := range 3 {
				resp, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
				if err != nil {
					t.Fatalf("call %d: %v", i, err)
				}
				body := resp.GetPayload().GetBody()
				if len(body) != size {
					t.Fatalf("call %d: %d bytes of payload, want %d", i, len(body), size)
				}
				if err := testserver.CheckPayloadBody(body); err != nil {
					t.Fatalf("call %d: %v", i, err)
				}
			}
		})
	}
}

// TestPaddedSplitDataFromClient: a client's request in DATA frames of
// every size, padded or not, written in pieces that end anywhere and
// ended by an empty DATA frame with END_STREAM, reaches a grpc-go backend
// byte for byte.
func TestPaddedSplitDataFromClient(t *testing.T) {
	verifyNoLeaks(t)
	const size = 150 << 10
	e := newEnv(t, envOpts{backends: 1,
		pcfg: func(c *proxy.Config) { c.StreamWindow, c.ConnWindow = 1<<20, 1<<20 },
		tscfg: func(_ int, c *testserver.Config) {
			c.UnaryCallF = func(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
				body := in.GetPayload().GetBody()
				if len(body) != size {
					return nil, fmt.Errorf("request payload of %d bytes, want %d", len(body), size)
				}
				if err := testserver.CheckPayloadBody(body); err != nil {
					return nil, err
				}
				return &testgrpc.SimpleResponse{}, nil
			}
		}})
	msg := grpcMsg(&testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: testserver.PayloadBody(size)}})
	r := dialRaw(t, e.addr)
	r.fr.WriteWindowUpdate(0, 1<<30)
	rng := rand.New(rand.NewPCG(9, 9))
	for i := range 3 {
		id := uint32(2*i + 1)
		r.headers(id, unaryPath, false)
		if err := writeChunks(rng, r.nc, dataFrames(rng, id, msg, true)); err != nil {
			t.Fatal(err)
		}
		f := r.next(func(f http2.Frame) bool {
			m, ok := f.(*http2.MetaHeadersFrame)
			return ok && m.StreamID == id && m.StreamEnded()
		}).(*http2.MetaHeadersFrame)
		if got := f.PseudoValue("status"); got != "" {
			t.Fatalf("call %d: trailers-only response with :status %s", i, got)
		}
		var st, detail string
		for _, hf := range f.Fields {
			switch hf.Name {
			case "grpc-status":
				st = hf.Value
			case "grpc-message":
				detail = hf.Value
			}
		}
		if st != "0" {
			t.Fatalf("call %d: grpc-status %q (%s), want 0", i, st, detail)
		}
	}
}
