package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// The fuzz targets here write arbitrary frame sequences at the proxy, from
// a client (FuzzClientFrames) and from a backend (FuzzBackendFrames). An
// input is a list of compact records, each
//
//	type(1) flags(1) stream(1) length(2, big endian) payload(length)
//
// with the payload cut to what is left, so that mutations keep the frame
// boundaries and the fuzzer spends its time on frame contents and order
// rather than on resynchronising a 9-byte header. Each record is written
// as one raw frame (Framer.WriteRawFrame), valid or not.

// fuzzRecord is one decoded record.
type fuzzRecord struct {
	typ     http2.FrameType
	flags   http2.Flags
	stream  uint32
	payload []byte
}

func decodeRecords(data []byte) []fuzzRecord {
	var out []fuzzRecord
	for len(data) >= 5 {
		n := int(binary.BigEndian.Uint16(data[3:5]))
		rec := fuzzRecord{typ: http2.FrameType(data[0]), flags: http2.Flags(data[1]), stream: uint32(data[2])}
		data = data[5:]
		n = min(n, len(data))
		rec.payload, data = data[:n], data[n:]
		out = append(out, rec)
	}
	return out
}

// encodeFrames turns frames written by build into records, for seeds.
// Stream ids must fit in a byte.
func encodeFrames(build func(fr *http2.Framer)) []byte {
	var wire bytes.Buffer
	fr := http2.NewFramer(&wire, nil)
	fr.AllowIllegalWrites = true
	build(fr)
	var out []byte
	b := wire.Bytes()
	for len(b) >= 9 {
		n := int(b[0])<<16 | int(b[1])<<8 | int(b[2])
		id := binary.BigEndian.Uint32(b[5:9]) & (1<<31 - 1)
		out = append(out, b[3], b[4], byte(id), byte(n>>8), byte(n))
		out = append(out, b[9:9+n]...)
		b = b[9+n:]
	}
	return out
}

// hpackBlock encodes name/value pairs.
func hpackBlock(kv ...string) []byte {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for i := 0; i+1 < len(kv); i += 2 {
		enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	return hb.Bytes()
}

func requestBlock(path string, extra ...string) []byte {
	return hpackBlock(append([]string{":method", "POST", ":scheme", "http", ":path", path, ":authority", "x", "content-type", "application/grpc", "te", "trailers"}, extra...)...)
}

// clientSeeds are the client-side table tests' frame sequences.
func clientSeeds() [][]byte {
	const unary = "/grpc.testing.TestService/UnaryCall"
	const duplex = "/grpc.testing.TestService/FullDuplexCall"
	msg := grpcMsg(&testgrpc.SimpleRequest{ResponseSize: 10})
	hdr := func(fr *http2.Framer, id uint32, path string, end bool, extra ...string) {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: requestBlock(path, extra...), EndHeaders: true, EndStream: end})
	}
	return [][]byte{
		encodeFrames(func(fr *http2.Framer) { // a good unary call
			hdr(fr, 1, unary, false)
			fr.WriteData(1, true, msg)
		}),
		encodeFrames(func(fr *http2.Framer) { // rapid reset
			for id := uint32(1); id < 40; id += 2 {
				hdr(fr, id, duplex, false)
				fr.WriteRSTStream(id, http2.ErrCodeCancel)
			}
		}),
		encodeFrames(func(fr *http2.Framer) { // empty DATA, PING, SETTINGS, WINDOW_UPDATE
			hdr(fr, 1, duplex, false)
			for range 8 {
				fr.WriteData(1, false, nil)
				fr.WritePing(false, [8]byte{1})
				fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 65535})
				fr.WriteWindowUpdate(1, 1)
			}
		}),
		encodeFrames(func(fr *http2.Framer) { // bad header blocks beside a good stream
			hdr(fr, 1, unary, false)
			hdr(fr, 3, unary, false, "X-Upper", "v")
			hdr(fr, 5, unary, false, ":foo", "v")
			hdr(fr, 7, unary, false, "x-a", "b", ":protocol", "v")
			fr.WriteData(3, true, msg)
			fr.WriteData(1, true, msg)
		}),
		encodeFrames(func(fr *http2.Framer) { // HEADERS split over CONTINUATION, some empty
			b := requestBlock(unary)
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: b[:3]})
			fr.WriteContinuation(1, false, nil)
			fr.WriteContinuation(1, false, b[3:7])
			fr.WriteContinuation(1, false, nil)
			fr.WriteContinuation(1, true, b[7:])
			fr.WriteData(1, true, msg)
		}),
		encodeFrames(func(fr *http2.Framer) { // trailers without END_STREAM, then a decreasing id
			hdr(fr, 3, unary, false)
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: hpackBlock("x-trailer", "v"), EndHeaders: true})
			fr.WriteData(3, true, msg)
			hdr(fr, 5, unary, false)
			fr.WriteData(5, true, msg)
			hdr(fr, 1, unary, true)
		}),
		encodeFrames(func(fr *http2.Framer) { // stream state errors
			fr.WriteRSTStream(9, http2.ErrCodeCancel) // idle stream
			hdr(fr, 3, unary, true)
			hdr(fr, 1, unary, true) // decreasing id
			fr.WriteData(3, true, msg)
			fr.WritePriority(5, http2.PriorityParam{StreamDep: 5})
		}),
		encodeFrames(func(fr *http2.Framer) { // trailers, content-length, window games
			hdr(fr, 1, unary, false, "content-length", "3")
			fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
			fr.WriteData(1, false, msg)
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hpackBlock(":path", "/x"), EndHeaders: true, EndStream: true})
			fr.WriteWindowUpdate(0, 1<<31-1)
			fr.WriteWindowUpdate(0, 1<<31-1)
		}),
		encodeFrames(func(fr *http2.Framer) { // RFC 9113 tables: closed streams, self-dependency, even ids
			hdr(fr, 1, unary, false)
			fr.WriteData(1, true, msg)
			fr.WriteData(1, false, msg)
			fr.WriteWindowUpdate(1, 1)
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: requestBlock(unary), EndHeaders: true, Priority: http2.PriorityParam{StreamDep: 3}})
			fr.WriteData(3, true, msg)
			fr.WriteData(2, false, msg)
		}),
		encodeFrames(func(fr *http2.Framer) { // push, unknown frame types, GOAWAY from a client
			fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: requestBlock(unary), EndHeaders: true})
			fr.WriteRawFrame(0x20, 0, 0, []byte("unknown"))
			hdr(fr, 1, unary, false)
			fr.WriteGoAway(1, http2.ErrCodeNo, nil)
			fr.WriteData(1, true, msg)
		}),
	}
}

// fuzzEnv is a proxy in front of one testserver and, optionally, one raw
// backend; calls to UnaryCall go to the raw backend when there is one.
type fuzzEnv struct {
	srv    *proxy.Server
	addr   string
	client testgrpc.TestServiceClient
}

func newFuzzEnv(tb testing.TB, raw string) *fuzzEnv {
	tb.Helper()
	ts := startTestserver(tb, testserver.Config{Name: "b0", Logger: quietLog})
	good := ts.Addr()
	pick := proxy.PickerFunc(func(ctx context.Context, method string) (string, func(error), error) {
		if raw != "" && method == "/grpc.testing.TestService/UnaryCall" {
			return raw, func(error) {}, nil
		}
		return good, func(error) {}, nil
	})
	srv, err := proxy.New(proxy.Config{Picker: pick, Logger: quietLog, HandshakeTimeout: 500 * time.Millisecond})
	if err != nil {
		tb.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	serveOn(tb, srv, ln)
	cc, err := grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cc.Close() })
	return &fuzzEnv{srv: srv, addr: ln.Addr().String(), client: testgrpc.NewTestServiceClient(cc)}
}

// healthy fails unless a good call through the proxy succeeds in time.
func (fe *fuzzEnv) healthy(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := fe.client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("good call after the input: %v", err)
	}
}

// FuzzClientFrames writes a frame sequence from a client, then a PING. The
// proxy must not panic, must answer the PING or close the connection
// within a few seconds, must drop its side of the connection once the
// client closes it, and must keep serving a good client.
func FuzzClientFrames(f *testing.F) {
	ignore := goleak.IgnoreCurrent()
	f.Cleanup(func() { goleak.VerifyNone(f, ignore) })
	for _, s := range clientSeeds() {
		f.Add(s)
	}
	fe := newFuzzEnv(f, "")
	fe.healthy(f) // the good client's connection, before the baseline
	base := fe.srv.ClientConns()
	f.Fuzz(func(t *testing.T, data []byte) {
		nc, err := net.Dial("tcp", fe.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		// The reader runs beside the writer so the proxy never blocks on
		// us; it reports whether our PING came back or the conn ended.
		answered := make(chan string, 1)
		go func() {
			fr := http2.NewFramer(io.Discard, nc)
			for {
				f, err := fr.ReadFrame()
				if err != nil {
					var se http2.StreamError
					if errors.As(err, &se) || errors.Is(err, http2.ErrFrameTooLarge) {
						continue
					}
					answered <- "closed"
					return
				}
				if p, ok := f.(*http2.PingFrame); ok && p.IsAck() && p.Data == [8]byte{'f', 'u', 'z', 'z'} {
					answered <- "ping"
					return
				}
			}
		}()
		w := bufio.NewWriter(nc)
		io.WriteString(w, http2.ClientPreface)
		fr := http2.NewFramer(w, nil)
		fr.AllowIllegalWrites = true
		fr.WriteSettings()
		for _, r := range decodeRecords(data) {
			if fr.WriteRawFrame(r.typ, r.flags, r.stream, r.payload) != nil {
				break
			}
		}
		fr.WritePing(false, [8]byte{'f', 'u', 'z', 'z'})
		w.Flush()
		select {
		case <-answered:
		case <-time.After(5 * time.Second):
			t.Fatalf("proxy neither answered PING nor closed the connection within 5s")
		}
		nc.Close()
		ctx := testkit.Context(t, 5*time.Second)
		testkit.WaitFor(ctx, t, "the proxy to drop the closed connection", func() bool { return fe.srv.ClientConns() <= base })
		fe.healthy(t)
	})
}

// backendSeeds are the bad-backend table tests' answers to stream 1.
func backendSeeds() [][]byte {
	resp := hpackBlock(":status", "200", "content-type", "application/grpc")
	trailers := hpackBlock("grpc-status", "0")
	msg := grpcMsg(&testgrpc.SimpleResponse{})
	return [][]byte{
		encodeFrames(func(fr *http2.Framer) { // a good answer
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: resp, EndHeaders: true})
			fr.WriteData(1, false, msg)
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: trailers, EndHeaders: true, EndStream: true})
		}),
		encodeFrames(func(fr *http2.Framer) { fr.WriteGoAway(0, http2.ErrCodeNo, nil) }),
		encodeFrames(func(fr *http2.Framer) { fr.WriteGoAway(1, http2.ErrCodeNo, nil) }),
		encodeFrames(func(fr *http2.Framer) { fr.WriteRSTStream(1, http2.ErrCodeRefusedStream) }),
		encodeFrames(func(fr *http2.Framer) { fr.WriteRSTStream(1, http2.ErrCodeInternal) }),
		encodeFrames(func(fr *http2.Framer) { // RFC 9113 §8.4, §5.1.1, §8.1
			fr.WriteSettings(http2.Setting{ID: http2.SettingEnablePush, Val: 1}, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 0})
			fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: resp, EndHeaders: true})
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 2, BlockFragment: resp, EndHeaders: true})
			fr.WriteData(1, false, msg)
		}),
		encodeFrames(func(fr *http2.Framer) { // messages, then a reset mid-stream
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: resp, EndHeaders: true})
			fr.WriteData(1, false, msg)
			fr.WriteData(1, false, nil)
			fr.WriteWindowUpdate(0, 1<<31-1)
			fr.WriteRSTStream(1, http2.ErrCodeCancel)
			fr.WriteData(1, false, msg)
		}),
		encodeFrames(func(fr *http2.Framer) { // RFC 9113 tables: idle and closed streams
			fr.WriteData(3, false, msg)
			fr.WriteWindowUpdate(5, 1)
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: resp, EndHeaders: true})
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: trailers, EndHeaders: true, EndStream: true})
			fr.WriteData(1, false, msg)
			fr.WriteRSTStream(1, http2.ErrCodeCancel)
		}),
		encodeFrames(func(fr *http2.Framer) { // headers split and trailers-only
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: resp[:2]})
			fr.WriteContinuation(1, false, nil)
			fr.WriteContinuation(1, true, resp[2:])
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hpackBlock(":status", "200", "grpc-status", "0"), EndHeaders: true, EndStream: true})
		}),
		encodeFrames(func(fr *http2.Framer) { // glitches: PING, SETTINGS, window nobody used, empty DATA
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: resp, EndHeaders: true})
			for i := range 16 {
				fr.WritePing(false, [8]byte{byte(i)})
				fr.WriteSettings()
				fr.WriteWindowUpdate(0, 1<<16)
				fr.WriteWindowUpdate(1, 1)
				fr.WriteData(1, false, nil)
			}
		}),
		encodeFrames(func(fr *http2.Framer) { // MAX_CONCURRENT_STREAMS 0, then raised
			fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 0})
			fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 10})
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hpackBlock(":status", "200", "grpc-status", "0"), EndHeaders: true, EndStream: true})
		}),
	}
}

// FuzzBackendFrames answers a call's HEADERS with a frame sequence from a
// raw backend (stream 1 in the records is the call's stream), which then
// closes the connection. The call must
// end within its deadline, whatever it ends with; the proxy must not panic
// and must keep serving calls to a good backend.
func FuzzBackendFrames(f *testing.F) {
	ignore := goleak.IgnoreCurrent()
	f.Cleanup(func() { goleak.VerifyNone(f, ignore) })
	for _, s := range backendSeeds() {
		f.Add(s)
	}
	var current atomic.Pointer[[]byte]
	raw := rawBackend(f, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil {
			return
		}
		s.buffered()
		s.fr.AllowIllegalWrites = true
		s.hello()
		s.serve(func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.PingFrame:
				if !f.IsAck() {
					s.fr.WritePing(true, f.Data)
				}
			case *http2.HeadersFrame:
				for _, r := range decodeRecords(*current.Load()) {
					id := r.stream
					if id == 1 {
						id = f.StreamID
					}
					s.fr.WriteRawFrame(r.typ, r.flags, id, r.payload)
				}
				// Then hang up, so that an input that leaves the
				// stream open costs a redial, not the call's deadline.
				return false
			}
			return true
		})
	})
	fe := newFuzzEnv(f, raw)
	f.Fuzz(func(t *testing.T, data []byte) {
		current.Store(&data)
		const deadline = time.Second
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		start := time.Now()
		fe.client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		if took := time.Since(start); took > deadline+time.Second {
			t.Fatalf("call took %v with a %v deadline", took, deadline)
		}
		fe.healthy(t)
	})
}
