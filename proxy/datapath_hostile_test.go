package proxy_test

// Hostile tests of the streaming data path from outside: DATA taken from
// the read buffer (frameloop.go bufferedFrame, takeData), payloads written by
// reference with sendmsg (connbuf.go), the proxy's own HPACK encoder
// (hpackenc.go). Raw HTTP/2 peers written with x/net's Framer, real gRPC
// backends, every byte checked.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// echoUnary answers a UnaryCall with the request's payload body.
func echoUnary(_ context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	return &testgrpc.SimpleResponse{Payload: &testgrpc.Payload{Body: in.GetPayload().GetBody()}}, nil
}

// rawResp is what a raw client read of one stream.
type rawResp struct {
	hdr, trl []hpack.HeaderField
	data     []byte
	reset    bool
}

func (r *rawResp) field(name string) string {
	for _, f := range append(append([]hpack.HeaderField(nil), r.hdr...), r.trl...) {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}

// body returns the payload body of the single gRPC message in r.data, a
// SimpleResponse.
func (r *rawResp) body() ([]byte, error) {
	if len(r.data) < 5 {
		return nil, fmt.Errorf("%d bytes of DATA, not a gRPC message", len(r.data))
	}
	n := binary.BigEndian.Uint32(r.data[1:5])
	if int(n) != len(r.data)-5 {
		return nil, fmt.Errorf("gRPC message of %d bytes in %d bytes of DATA", n, len(r.data)-5)
	}
	var m testgrpc.SimpleResponse
	if err := proto.Unmarshal(r.data[5:], &m); err != nil {
		return nil, err
	}
	return m.GetPayload().GetBody(), nil
}

// collect reads frames until every stream of ids ended (trailers with
// END_STREAM, or RST_STREAM) and returns what each carried. The Framer
// must decode header blocks (ReadMetaHeaders set).
func (r *rawConn) collect(ids map[uint32]bool) map[uint32]*rawResp {
	r.t.Helper()
	out := map[uint32]*rawResp{}
	left := len(ids)
	for left > 0 {
		f, err := r.fr.ReadFrame()
		if err != nil {
			r.t.Fatalf("reading with %d streams to end: %v", left, err)
		}
		id := f.Header().StreamID
		if id == 0 {
			if g, ok := f.(*http2.GoAwayFrame); ok {
				r.t.Fatalf("GOAWAY %v %q", g.ErrCode, g.DebugData())
			}
			continue
		}
		if !ids[id] {
			r.t.Fatalf("frame %v on stream %d, not one of ours", f.Header().Type, id)
		}
		s := out[id]
		if s == nil {
			s = &rawResp{}
			out[id] = s
		}
		ended := false
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			if s.hdr == nil && f.PseudoValue("status") != "" {
				s.hdr = f.Fields
			} else {
				s.trl = f.Fields
			}
			ended = f.StreamEnded()
		case *http2.DataFrame:
			s.data = append(s.data, f.Data()...)
			ended = f.StreamEnded()
			if ended {
				r.t.Fatalf("stream %d ended by DATA, not by trailers", id)
			}
		case *http2.RSTStreamFrame:
			s.reset = true
			ended = true
		}
		if ended {
			delete(ids, id)
			left--
		}
	}
	return out
}

// requestHeaders is the HEADERS frame of a UnaryCall on stream id, with
// extra fields (name, value pairs).
func requestHeaders(fr *http2.Framer, id uint32, extra ...string) {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	f := append([]string{":method", "POST", ":scheme", "http", ":path", unaryPath, ":authority", "x", "content-type", "application/grpc", "te", "trailers"}, extra...)
	for i := 0; i < len(f); i += 2 {
		enc.WriteField(hpack.HeaderField{Name: f[i], Value: f[i+1]})
	}
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true})
}

// TestDataSplitAtEveryByte: a request whose HEADERS and DATA frames
// (padded, padding only, padded with no padding, plain, 255 bytes of
// padding, an empty END_STREAM) reach the proxy in two writes split at
// every byte boundary, one stream per boundary, and once a byte per
// write: the backend gets the request byte for byte and its echo comes
// back byte for byte, on every stream.
func TestDataSplitAtEveryByte(t *testing.T) {
	verifyNoLeaks(t)
	const size = 120
	e := newEnv(t, envOpts{backends: 2, tscfg: func(_ int, c *testserver.Config) {
		c.UnaryCallF = func(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
			if b := in.GetPayload().GetBody(); len(b) != size || testserver.CheckPayloadBody(b) != nil {
				return nil, fmt.Errorf("request body of %d bytes, corrupted or cut", len(b))
			}
			return echoUnary(ctx, in)
		}
	}})
	msg := grpcMsg(&testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: testserver.PayloadBody(size)}})
	request := func(id uint32) []byte {
		var b bytes.Buffer
		fr := http2.NewFramer(&b, nil)
		requestHeaders(fr, id)
		fr.WriteDataPadded(id, false, msg[:40], make([]byte, 7))
		fr.WriteDataPadded(id, false, nil, make([]byte, 3)) // padding only
		fr.WriteDataPadded(id, false, msg[40:41], []byte{}) // PADDED, pad length 0
		fr.WriteData(id, false, msg[41:100])
		fr.WriteDataPadded(id, false, msg[100:], make([]byte, 255))
		fr.WriteData(id, true, nil)
		return b.Bytes()
	}
	r := dialRawWide(t, e.addr)
	r.nc.SetDeadline(time.Now().Add(60 * time.Second))
	check := func(got map[uint32]*rawResp) {
		t.Helper()
		for id, s := range got {
			if s.reset || s.field("grpc-status") != "0" {
				t.Fatalf("stream %d: reset %v, grpc-status %q (%s)", id, s.reset, s.field("grpc-status"), s.field("grpc-message"))
			}
			body, err := s.body()
			if err != nil || len(body) != size || testserver.CheckPayloadBody(body) != nil {
				t.Fatalf("stream %d: echoed body of %d bytes corrupted (%v)", id, len(body), err)
			}
		}
	}
	n := len(request(1))
	id := uint32(1)
	// One byte per write.
	for _, c := range request(id) {
		if _, err := r.nc.Write([]byte{c}); err != nil {
			t.Fatal(err)
		}
	}
	check(r.collect(map[uint32]bool{id: true}))
	// Two writes, split at every boundary; 64 streams in flight at a time.
	ids := map[uint32]bool{}
	for k := 1; k < n; k++ {
		id += 2
		b := request(id)
		if len(b) != n {
			t.Fatalf("request of %d bytes on stream %d, want %d", len(b), id, n)
		}
		if _, err := r.nc.Write(b[:k]); err != nil {
			t.Fatal(err)
		}
		if _, err := r.nc.Write(b[k:]); err != nil {
			t.Fatal(err)
		}
		ids[id] = true
		if len(ids) == 64 || k == n-1 {
			want := len(ids)
			got := r.collect(ids)
			if len(got) != want {
				t.Fatalf("%d streams answered, want %d", len(got), want)
			}
			check(got)
		}
	}
}

// TestInterleavedStreamsOneWrite: the HEADERS and DATA of 48 streams,
// DATA frames of random sizes (some padded, some padding only)
// interleaved at random, all in one write of about a megabyte: every
// stream's request reaches a backend intact and its echo comes back
// intact, on a connection whose responses the proxy writes by reference
// while it reads the next streams' DATA from its read buffer.
func TestInterleavedStreamsOneWrite(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 3, tscfg: func(_ int, c *testserver.Config) { c.UnaryCallF = echoUnary }})
	r := dialRawWide(t, e.addr)
	r.nc.SetDeadline(time.Now().Add(60 * time.Second))
	rng := rand.New(rand.NewPCG(7, 48))
	for round := range 2 {
		const streams = 48
		var b bytes.Buffer
		fr := http2.NewFramer(&b, nil)
		bodies := map[uint32][]byte{}
		frames := map[uint32][]byte{}
		var order []uint32
		for i := range streams {
			id := uint32(1 + 2*(round*streams+i))
			body := make([]byte, []int{0, 1, 4095, 4096, 16384, 16385, rng.IntN(40000), rng.IntN(40000)}[i%8])
			for j := range body {
				body[j] = byte(rng.Uint32())
			}
			bodies[id] = body
			requestHeaders(fr, id)
			frames[id] = dataFrames(rng, id, grpcMsg(&testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: body}}), true)
			order = append(order, id)
		}
		// Interleave whole frames of the streams at random.
		for len(order) > 0 {
			i := rng.IntN(len(order))
			id := order[i]
			f := frames[id]
			n := 9 + (int(f[0])<<16 | int(f[1])<<8 | int(f[2]))
			b.Write(f[:n])
			if frames[id] = f[n:]; len(frames[id]) == 0 {
				order = append(order[:i], order[i+1:]...)
			}
		}
		all := b.Bytes()
		werr := make(chan error, 1)
		go func() { _, err := r.nc.Write(all); werr <- err }()
		ids := map[uint32]bool{}
		for id := range bodies {
			ids[id] = true
		}
		got := r.collect(ids)
		if err := <-werr; err != nil {
			t.Fatal(err)
		}
		for id, want := range bodies {
			s := got[id]
			if s == nil || s.reset || s.field("grpc-status") != "0" {
				t.Fatalf("round %d stream %d: %+v", round, id, s)
			}
			body, err := s.body()
			if err != nil {
				t.Fatalf("round %d stream %d: %v", round, id, err)
			}
			if !bytes.Equal(body, want) {
				t.Fatalf("round %d stream %d: echo of %d bytes differs from the %d sent (sha256 %x, want %x)", round, id, len(body), len(want), sha256.Sum256(body), sha256.Sum256(want))
			}
		}
	}
}

// hpackSizeUpdates parses the dynamic table size updates a header block
// starts with (RFC 7541 §6.3) and returns the last, or -1 if none.
func hpackSizeUpdates(t *testing.T, block []byte) int64 {
	t.Helper()
	last := int64(-1)
	for len(block) > 0 && block[0]&0xe0 == 0x20 {
		v := uint64(block[0] & 0x1f)
		block = block[1:]
		if v == 0x1f {
			m := uint(0)
			for {
				if len(block) == 0 {
					t.Fatal("size update cut short")
				}
				c := block[0]
				block = block[1:]
				v += uint64(c&0x7f) << m
				m += 7
				if c&0x80 == 0 {
					break
				}
			}
		}
		last = int64(v)
	}
	return last
}

// TestHeaderTableSizeChurn: a client that sets SETTINGS_HEADER_TABLE_SIZE
// to odd values mid-connection (down, up again, down to 0) while calls
// flow whose metadata the backends echo: repeated values, values new with
// every call, one exactly the size of the table, one larger than any
// table, and never-indexed ones. Every block is decoded here by x/net's
// decoder in wire order, every echoed value must come back as sent, and
// after the proxy acknowledged a setting, its blocks must say (size
// update) that its table is no larger than the smallest size set so far.
func TestHeaderTableSizeChurn(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2})
	r := dialRawPreface(t, e.addr)
	r.nc.SetDeadline(time.Now().Add(60 * time.Second))
	r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	r.fr.ReadMetaHeaders = nil // blocks are decoded here, in order
	dec := hpack.NewDecoder(4096, nil)
	dec.SetMaxStringLength(1 << 20)
	tableSize := int64(4096) // as the proxy's last size update said
	minAcked := int64(4096)  // smallest size the proxy acknowledged
	sent := []int64{4096}    // sizes sent, not yet acknowledged: the first SETTINGS leaves 4,096
	id := uint32(1)
	rng := rand.New(rand.NewPCG(3, 5))
	for stage, size := range []int64{4095, 4001, 4096, 2049, 1023, 65536, 257, 97, 4096, 64, 33, 1, 0, 4096, 0} {
		r.fr.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: uint32(size)})
		sent = append(sent, size)
		type call struct{ want, wantTrl map[string]string }
		calls := map[uint32]call{}
		for i := range 6 {
			c := call{want: map[string]string{}, wantTrl: map[string]string{}}
			c.want["x-echo-shared"] = fmt.Sprintf("shared-%d", i%2)
			c.want["x-echo-unique"] = fmt.Sprintf("stage%d-call%d-%d", stage, i, rng.Uint64())
			c.wantTrl["x-echo-trailer-t"] = fmt.Sprint(i % 3)
			// Fields whose HPACK size (name, value, 32) is the table's
			// size, one byte less and one more, when they can be.
			for d, name := range map[int64]string{-1: "x-echo-under", 0: "x-echo-exact", 1: "x-echo-over1"} {
				if v := size + d - 32 - int64(len(name)); v >= 0 && v < 8192 {
					c.want[name] = strings.Repeat(name[7:8], int(v))
				}
			}
			if i == 2 {
				c.want["x-echo-big"] = strings.Repeat("b", 5000) // larger than any table
			}
			if i == 4 {
				for j := range 40 { // many distinct values: evictions
					c.want[fmt.Sprintf("x-echo-d%d", j)] = fmt.Sprintf("%d-%d-%d", stage, i, j)
				}
			}
			var extra []string
			for k, v := range c.want {
				extra = append(extra, k, v)
			}
			for k, v := range c.wantTrl {
				extra = append(extra, k, v)
			}
			// A never-indexed field from the client (RFC 7541 §7.1.3).
			var hb bytes.Buffer
			enc := hpack.NewEncoder(&hb)
			f := append([]string{":method", "POST", ":scheme", "http", ":path", unaryPath, ":authority", "x", "content-type", "application/grpc", "te", "trailers"}, extra...)
			for j := 0; j < len(f); j += 2 {
				enc.WriteField(hpack.HeaderField{Name: f[j], Value: f[j+1]})
			}
			c.want["x-echo-secret"] = fmt.Sprintf("secret-%d", i%2)
			enc.WriteField(hpack.HeaderField{Name: "x-echo-secret", Value: c.want["x-echo-secret"], Sensitive: true})
			r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true})
			r.fr.WriteData(id, true, grpcMsg(&testgrpc.SimpleRequest{ResponseSize: 10}))
			calls[id] = c
			id += 2
		}
		got := map[uint32][][]hpack.HeaderField{}
		var block []byte
		for ended := 0; ended < len(calls); {
			f, err := r.fr.ReadFrame()
			if err != nil {
				t.Fatalf("stage %d (size %d): reading: %v", stage, size, err)
			}
			var frag []byte
			endHeaders, endStream := false, false
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if f.IsAck() {
					if len(sent) == 0 {
						t.Fatal("SETTINGS ACK for nothing sent")
					}
					minAcked = min(minAcked, sent[0])
					sent = sent[1:]
				}
				continue
			case *http2.GoAwayFrame:
				t.Fatalf("stage %d: GOAWAY %v %q", stage, f.ErrCode, f.DebugData())
			case *http2.RSTStreamFrame:
				t.Fatalf("stage %d: stream %d reset %v", stage, f.StreamID, f.ErrCode)
			case *http2.HeadersFrame:
				frag, endHeaders, endStream = f.HeaderBlockFragment(), f.HeadersEnded(), f.StreamEnded()
				block = append(block[:0], frag...)
			case *http2.ContinuationFrame:
				block = append(block, f.HeaderBlockFragment()...)
				endHeaders = f.HeadersEnded()
			default:
				continue
			}
			if !endHeaders {
				continue
			}
			if u := hpackSizeUpdates(t, block); u >= 0 {
				tableSize = u
			}
			if tableSize > minAcked {
				t.Fatalf("stage %d: a block after SETTINGS_HEADER_TABLE_SIZE %d was acknowledged uses a table of %d bytes", stage, minAcked, tableSize)
			}
			fields, err := dec.DecodeFull(block)
			if err != nil {
				t.Fatalf("stage %d (size %d): decoding the proxy's block %x: %v", stage, size, block, err)
			}
			sid := f.Header().StreamID
			got[sid] = append(got[sid], fields)
			if endStream {
				ended++
			}
		}
		for sid, c := range calls {
			blocks := got[sid]
			if len(blocks) != 2 {
				t.Fatalf("stage %d stream %d: %d header blocks, want headers and trailers", stage, sid, len(blocks))
			}
			value := func(fs []hpack.HeaderField, name string) (string, bool, int) {
				v, sens, n := "", false, 0
				for _, f := range fs {
					if f.Name == name {
						v, sens, n = f.Value, f.Sensitive, n+1
					}
				}
				return v, sens, n
			}
			if v, _, _ := value(blocks[1], "grpc-status"); v != "0" {
				t.Fatalf("stage %d stream %d: trailers %v", stage, sid, blocks[1])
			}
			for k, want := range c.want {
				if v, _, n := value(blocks[0], k); n != 1 || v != want {
					t.Fatalf("stage %d stream %d: %s came back %d times as %.40q, want %.40q", stage, sid, k, n, v, want)
				}
			}
			for k, want := range c.wantTrl {
				if v, _, n := value(blocks[1], k); n != 1 || v != want {
					t.Fatalf("stage %d stream %d: trailer %s came back %d times as %.40q, want %.40q", stage, sid, k, n, v, want)
				}
			}
		}
	}
	if len(sent) != 0 || minAcked != 0 {
		t.Fatalf("%d settings not acknowledged, smallest acknowledged %d; want all, 0", len(sent), minAcked)
	}
}

// TestRandomSizesEndToEnd: many concurrent unary and bidi calls over a
// few client connections, messages of random sizes from 0 B to 1 MiB
// (and the sizes at the proxy's thresholds: 4 KiB for writes by
// reference, 16 KiB frames), echoed by the backends; every byte is
// compared both ways.
func TestRandomSizesEndToEnd(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 3, tscfg: func(_ int, c *testserver.Config) {
		c.UnaryCallF = echoUnary
		c.FullDuplexCallF = func(stream testgrpc.TestService_FullDuplexCallServer) error {
			for {
				in, err := stream.Recv()
				if errors.Is(err, io.EOF) {
					return nil
				}
				if err != nil {
					return err
				}
				if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: in.GetPayload()}); err != nil {
					return err
				}
			}
		}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	clients := []testgrpc.TestServiceClient{e.client}
	for range 2 {
		cc, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(4<<20)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		clients = append(clients, testgrpc.NewTestServiceClient(cc))
	}
	size := func(rng *rand.Rand) int {
		switch rng.IntN(10) {
		case 0:
			return 0
		case 1:
			return []int{1, 4091, 4092, 4096, 16379, 16384, 16385, 65536}[rng.IntN(8)]
		case 2:
			return rng.IntN(1<<20 + 1)
		default:
			return rng.IntN(64 << 10)
		}
	}
	body := func(rng *rand.Rand, n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	const workers, calls = 12, 10
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			client := clients[w%len(clients)]
			for i := range calls {
				if w%3 == 0 {
					stream, err := client.FullDuplexCall(ctx)
					if err != nil {
						errs <- fmt.Errorf("worker %d call %d: %v", w, i, err)
						return
					}
					for m := range 4 {
						want := body(rng, size(rng))
						if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: want}}); err != nil {
							errs <- fmt.Errorf("worker %d call %d message %d: send: %v", w, i, m, err)
							return
						}
						in, err := stream.Recv()
						if err != nil {
							errs <- fmt.Errorf("worker %d call %d message %d: recv: %v", w, i, m, err)
							return
						}
						if got := in.GetPayload().GetBody(); !bytes.Equal(got, want) {
							errs <- fmt.Errorf("worker %d call %d message %d: echo of %d bytes (sha256 %x) differs from the %d sent (%x)", w, i, m, len(got), sha256.Sum256(got), len(want), sha256.Sum256(want))
							return
						}
					}
					stream.CloseSend()
					if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
						errs <- fmt.Errorf("worker %d call %d: end: %v, want EOF", w, i, err)
						return
					}
					continue
				}
				want := body(rng, size(rng))
				resp, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: want}})
				if err != nil {
					errs <- fmt.Errorf("worker %d call %d (%d bytes): %v", w, i, len(want), err)
					return
				}
				if got := resp.GetPayload().GetBody(); !bytes.Equal(got, want) {
					errs <- fmt.Errorf("worker %d call %d: echo of %d bytes (sha256 %x) differs from the %d sent (%x)", w, i, len(got), sha256.Sum256(got), len(want), sha256.Sum256(want))
					return
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

// TestResetAndCloseMidWrite: a client resets half of its streams while
// the proxy writes their 1 MiB answers (by reference, from pooled
// buffers), and the other half arrive intact; once every stream is over,
// the connection's buffer budget is back to zero (every pooled buffer
// written by reference was given back through it). Then a client closes
// its connection in the middle of such answers, and the proxy serves a
// new client as before.
func TestResetAndCloseMidWrite(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2})
	ps := e.srv.(*proxy.Server)
	const size = 1 << 20
	r := dialRawWide(t, e.addr)
	r.nc.SetDeadline(time.Now().Add(60 * time.Second))
	ids := map[uint32]bool{}
	for i := range 16 {
		id := uint32(1 + 2*i)
		r.headers(id, unaryPath, false)
		r.fr.WriteData(id, true, grpcMsg(&testgrpc.SimpleRequest{ResponseSize: size}))
		ids[id] = true
	}
	out := map[uint32]*rawResp{}
	resetSent := map[uint32]bool{}
	for left := len(ids); left > 0; {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading: %v", err)
		}
		id := f.Header().StreamID
		if id == 0 {
			if g, ok := f.(*http2.GoAwayFrame); ok {
				t.Fatalf("GOAWAY %v %q", g.ErrCode, g.DebugData())
			}
			continue
		}
		s := out[id]
		if s == nil {
			s = &rawResp{}
			out[id] = s
		}
		switch f := f.(type) {
		case *http2.DataFrame:
			if resetSent[id] {
				continue // in flight when the reset was sent
			}
			s.data = append(s.data, f.Data()...)
			if id%4 == 1 && !resetSent[id] {
				// Streams 1, 5, 9, ...: reset at their first DATA.
				resetSent[id] = true
				r.fr.WriteRSTStream(id, http2.ErrCodeCancel)
				left--
			}
		case *http2.MetaHeadersFrame:
			if resetSent[id] {
				continue
			}
			if s.hdr == nil && f.PseudoValue("status") != "" {
				s.hdr = f.Fields
			} else {
				s.trl = f.Fields
			}
			if f.StreamEnded() {
				left--
			}
		case *http2.RSTStreamFrame:
			if !resetSent[id] {
				t.Fatalf("stream %d reset by the proxy: %v", id, f.ErrCode)
			}
		}
	}
	for id, s := range out {
		if resetSent[id] {
			continue
		}
		if s.field("grpc-status") != "0" {
			t.Fatalf("stream %d: grpc-status %q (%s)", id, s.field("grpc-status"), s.field("grpc-message"))
		}
		body, err := s.body()
		if err != nil || len(body) != size || testserver.CheckPayloadBody(body) != nil {
			t.Fatalf("stream %d: body of %d bytes corrupted (%v)", id, len(body), err)
		}
	}
	if len(resetSent) != 8 {
		t.Fatalf("%d streams reset, want 8", len(resetSent))
	}
	// Every buffer goes back through the budget once the streams are over.
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(10 * time.Second)
	for ps.MaxBufferedBytes() != 0 {
		select {
		case <-deadline:
			t.Fatalf("buffer budget at %d bytes with every stream over, want 0", ps.MaxBufferedBytes())
		case <-tick.C:
		}
	}

	// A client that goes away in the middle of the answers.
	r2 := dialRawWide(t, e.addr)
	for i := range 8 {
		id := uint32(1 + 2*i)
		r2.headers(id, unaryPath, false)
		r2.fr.WriteData(id, true, grpcMsg(&testgrpc.SimpleRequest{ResponseSize: size}))
	}
	r2.next(func(f http2.Frame) bool { _, ok := f.(*http2.DataFrame); return ok })
	r2.nc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := range 4 {
		resp, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: size})
		if err != nil {
			t.Fatalf("call %d after a client went away: %v", i, err)
		}
		if b := resp.GetPayload().GetBody(); len(b) != size || testserver.CheckPayloadBody(b) != nil {
			t.Fatalf("call %d: body of %d bytes corrupted", i, len(b))
		}
	}
}

// TestHugeEchoedMetadata: backends echo metadata of tens of KiB, in
// header blocks the proxy must send in CONTINUATION frames to the client,
// through both of its encoders, while other calls carry small blocks on
// the same connections; every value comes back as sent. Metadata over the
// client's header list limit ends its own call only.
func TestHugeEchoedMetadata(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 10 {
				want := map[string]string{"x-echo-small": fmt.Sprintf("%d-%d", w, i)}
				if (w+i)%2 == 0 {
					for j := range 5 { // 5 x 8 KiB: a 40 KiB block in three frames
						want[fmt.Sprintf("x-echo-huge%d", j)] = strings.Repeat(string(rune('a'+j)), 8<<10-i)
					}
				}
				var pairs []string
				for k, v := range want {
					pairs = append(pairs, k, v)
				}
				var hdr metadata.MD
				if _, err := e.client.UnaryCall(metadata.AppendToOutgoingContext(ctx, pairs...), &testgrpc.SimpleRequest{ResponseSize: 10}, grpc.Header(&hdr)); err != nil {
					errs <- fmt.Errorf("worker %d call %d: %v", w, i, err)
					return
				}
				for k, v := range want {
					if got := hdr.Get(k); len(got) != 1 || got[0] != v {
						errs <- fmt.Errorf("worker %d call %d: %s came back as %.40q (%d values), want %.40q", w, i, k, got, len(got), v)
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
	// Over the proxy's 60 KiB header list limit: refused, and the next
	// call works.
	big := metadata.AppendToOutgoingContext(ctx, "x-echo-over", strings.Repeat("o", 70<<10))
	if _, err := e.client.UnaryCall(big, &testgrpc.SimpleRequest{}); err == nil {
		t.Error("a call with 70 KiB of metadata succeeded, want it refused")
	}
	if _, err := e.client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 10}); err != nil {
		t.Errorf("call after the oversized one: %v", err)
	}
}

// TestBackendInterleavedOneWrite: a raw backend whose SETTINGS set an odd
// HPACK table size (77 bytes) answers each wave of 8 concurrent calls at
// once: the HEADERS, DATA frames (random sizes, some padded, some padding
// only) and trailers of all 8 interleaved in one write. The proxy's
// request header blocks must decode in the backend's 77-byte table (each
// call's x-id read here), and every caller gets its own echo, byte for
// byte, with its own x-id back.
func TestBackendInterleavedOneWrite(t *testing.T) {
	verifyNoLeaks(t)
	const wave = 8
	var bad sync.Map // what the backend found wrong, by stream
	raw := rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 77}, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20}) != nil {
			return
		}
		s.fr.WriteWindowUpdate(0, 1<<30)
		dec := hpack.NewDecoder(77, nil)
		type req struct {
			xid  string
			data []byte
		}
		reqs := map[uint32]*req{}
		var done []uint32
		rng := rand.New(rand.NewPCG(1, 77))
		s.serve(func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.HeadersFrame:
				fields, err := dec.DecodeFull(f.HeaderBlockFragment())
				if err != nil || !f.HeadersEnded() {
					bad.Store(f.StreamID, fmt.Sprintf("request block %x: %v (END_HEADERS %v)", f.HeaderBlockFragment(), err, f.HeadersEnded()))
					return false
				}
				r := &req{}
				for _, hf := range fields {
					if hf.Name == "x-id" {
						r.xid = hf.Value
					}
				}
				reqs[f.StreamID] = r
			case *http2.DataFrame:
				r := reqs[f.StreamID]
				if r == nil {
					return false
				}
				r.data = append(r.data, f.Data()...)
				if f.StreamEnded() {
					done = append(done, f.StreamID)
				}
			}
			if len(done) < wave {
				return true
			}
			// The whole wave's answers, interleaved, in one write.
			var b bytes.Buffer
			fr := http2.NewFramer(&b, nil)
			frames := map[uint32][]byte{}
			for _, id := range done {
				r := reqs[id]
				delete(reqs, id)
				var m testgrpc.SimpleRequest
				if len(r.data) < 5 || proto.Unmarshal(r.data[5:], &m) != nil {
					bad.Store(id, "request message unreadable")
				}
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hpackBlock(":status", "200", "content-type", "application/grpc", "x-id", r.xid), EndHeaders: true})
				msg := grpcMsg(&testgrpc.SimpleResponse{Payload: &testgrpc.Payload{Body: m.GetPayload().GetBody()}})
				frames[id] = append(dataFrames(rng, id, msg, false), func() []byte {
					var t bytes.Buffer
					http2.NewFramer(&t, nil).WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hpackBlock("grpc-status", "0"), EndHeaders: true, EndStream: true})
					return t.Bytes()
				}()...)
			}
			order := append([]uint32(nil), done...)
			done = done[:0]
			for len(order) > 0 {
				i := rng.IntN(len(order))
				f := frames[order[i]]
				n := 9 + (int(f[0])<<16 | int(f[1])<<8 | int(f[2]))
				b.Write(f[:n])
				if frames[order[i]] = f[n:]; len(frames[order[i]]) == 0 {
					order = append(order[:i], order[i+1:]...)
				}
			}
			_, err := nc.Write(b.Bytes())
			return err == nil
		})
	})
	_, client := twoBackendProxy(t, raw, proxy.Config{BackendStreamWindow: 1 << 20, ConnWindow: 16 << 20})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rng := rand.New(rand.NewPCG(8, 8))
	for w := range 4 {
		var wg sync.WaitGroup
		errs := make(chan error, wave)
		for i := range wave {
			want := make([]byte, []int{0, 1, 4096, 16384, 16385, rng.IntN(100000), rng.IntN(100000), rng.IntN(300000)}[i])
			for j := range want {
				want[j] = byte(rng.Uint32())
			}
			xid := fmt.Sprintf("wave%d-call%d-%s", w, i, strings.Repeat("i", rng.IntN(60)))
			wg.Add(1)
			go func() {
				defer wg.Done()
				var hdr metadata.MD
				resp, err := client.UnaryCall(metadata.AppendToOutgoingContext(ctx, "x-id", xid), &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: want}}, grpc.Header(&hdr))
				if err != nil {
					errs <- fmt.Errorf("%s: %v", xid, err)
					return
				}
				if got := hdr.Get("x-id"); len(got) != 1 || got[0] != xid {
					errs <- fmt.Errorf("%s: x-id came back as %q", xid, got)
				}
				if got := resp.GetPayload().GetBody(); !bytes.Equal(got, want) {
					errs <- fmt.Errorf("%s: echo of %d bytes (sha256 %x) differs from the %d sent (%x)", xid, len(got), sha256.Sum256(got), len(want), sha256.Sum256(want))
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		bad.Range(func(k, v any) bool { t.Errorf("backend, stream %v: %v", k, v); return true })
		if t.Failed() {
			t.FailNow()
		}
	}
}

// TestBackendDataSplitAtEveryByte: a raw backend writes each answer
// (HEADERS, DATA frames padded, padding only, PADDED with no padding,
// plain, 255 bytes of padding, trailers) in two writes split at a
// different byte boundary for every call, every boundary in turn, and
// once a byte per write; every answer reaches the grpc-go client byte for
// byte.
func TestBackendDataSplitAtEveryByte(t *testing.T) {
	verifyNoLeaks(t)
	const size = 120
	msg := grpcMsg(&testgrpc.SimpleResponse{Payload: &testgrpc.Payload{Body: testserver.PayloadBody(size)}})
	answer := func(id uint32) []byte {
		var b bytes.Buffer
		fr := http2.NewFramer(&b, nil)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hpackBlock(":status", "200", "content-type", "application/grpc"), EndHeaders: true})
		fr.WriteDataPadded(id, false, msg[:40], make([]byte, 7))
		fr.WriteDataPadded(id, false, nil, make([]byte, 3))
		fr.WriteDataPadded(id, false, msg[40:41], []byte{})
		fr.WriteData(id, false, msg[41:100])
		fr.WriteDataPadded(id, false, msg[100:], make([]byte, 255))
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hpackBlock("grpc-status", "0"), EndHeaders: true, EndStream: true})
		return b.Bytes()
	}
	n := len(answer(1))
	raw := rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		call := 0
		s.serve(func(f http2.Frame) bool {
			h, ok := f.(*http2.HeadersFrame)
			if !ok {
				return true
			}
			b := answer(h.StreamID)
			k := call % n
			call++
			if k == 0 {
				for _, c := range b { // a byte per write
					if _, err := nc.Write([]byte{c}); err != nil {
						return false
					}
				}
				return true
			}
			if _, err := nc.Write(b[:k]); err != nil {
				return false
			}
			_, err := nc.Write(b[k:])
			return err == nil
		})
	})
	_, client := twoBackendProxy(t, raw, proxy.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i := range n {
		resp, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		if err != nil {
			t.Fatalf("call %d (split at %d): %v", i, i, err)
		}
		if b := resp.GetPayload().GetBody(); len(b) != size || testserver.CheckPayloadBody(b) != nil {
			t.Fatalf("call %d (split at %d): body of %d bytes corrupted", i, i, len(b))
		}
	}
}

// TestBackendClosesMidRequest: a backend that grants a large window and
// then drops its connection at the first DATA of a 1 MiB request, while
// the proxy is writing the request by reference: the call fails (or is
// retried on the other backend), the client connection's buffer budget
// comes back to zero, and the proxy serves the next calls.
func TestBackendClosesMidRequest(t *testing.T) {
	verifyNoLeaks(t)
	raw := rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30}) != nil {
			return
		}
		s.fr.WriteWindowUpdate(0, 1<<30)
		s.serve(func(f http2.Frame) bool {
			_, data := f.(*http2.DataFrame)
			return !data // close at the first DATA
		})
	})
	srv, _, client := twoBackendServer(t, raw, testserver.Config{UnaryCallF: echoUnary}, proxy.Config{StreamWindow: 4 << 20, ConnWindow: 8 << 20})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	body := testserver.PayloadBody(1 << 20)
	for i := range 4 {
		resp, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: body}})
		if err == nil && !bytes.Equal(resp.GetPayload().GetBody(), body) {
			t.Fatalf("call %d: retried call's echo corrupted", i)
		}
		t.Logf("call %d: %v", i, err)
		if ctx.Err() != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for srv.MaxBufferedBytes() != 0 {
		select {
		case <-ctx.Done():
			t.Fatalf("buffer budget at %d bytes with every call over, want 0", srv.MaxBufferedBytes())
		case <-tick.C:
		}
	}
	if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("call after the backend went away: %v", err)
	}
}
