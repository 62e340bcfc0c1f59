package proxy_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// Tests of the response hold-back (holdback.go): a backend that fails in
// the middle of a gRPC message costs the client that message only, and the
// client sees the status a direct client sees.

// writeGRPCHeaders writes a 200 response's HEADERS with content-type
// application/grpc on stream id.
func writeGRPCHeaders(fr *http2.Framer, id uint32) {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	enc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
	enc.WriteField(hpack.HeaderField{Name: "content-type", Value: "application/grpc"})
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true})
}

// writeOKTrailers ends stream id with grpc-status 0.
func writeOKTrailers(fr *http2.Framer, id uint32) {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	enc.WriteField(hpack.HeaderField{Name: "grpc-status", Value: "0"})
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: true})
}

// payloadMsg is a length-prefixed StreamingOutputCallResponse carrying a
// body of n bytes, each its index mod 251, so a torn or shifted message
// shows.
func payloadMsg(n int) []byte {
	body := make([]byte, n)
	for i := range body {
		body[i] = byte(i % 251)
	}
	return grpcMsg(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: body}})
}

// holdResult is what a client saw of one call: the messages it received
// and the status it ended with.
type holdResult struct {
	msgs int
	code codes.Code
	err  error
}

// callRaw makes one call of the given kind over cc and reports what came
// back.
func callRaw(ctx context.Context, cc *grpc.ClientConn, unary bool) holdResult {
	c := testgrpc.NewTestServiceClient(cc)
	if unary {
		_, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		n := 0
		if err == nil {
			n = 1
		}
		return holdResult{msgs: n, code: status.Code(err), err: err}
	}
	st, err := c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
	if err != nil {
		return holdResult{code: status.Code(err), err: err}
	}
	msgs, err := drain(st.Recv)
	return holdResult{msgs: len(msgs), code: status.Code(err), err: err}
}

// holdFault is a way for a raw backend to fail stream id once the proxy
// has read its answer (halfMessageH2's then).
type holdFault struct {
	name string
	do   func(s *h2Server, id uint32) bool // false: close the connection
}

var (
	faultClose     = holdFault{"connection closed", func(*h2Server, uint32) bool { return false }}
	faultRSTCancel = holdFault{"RST_STREAM CANCEL", func(s *h2Server, id uint32) bool {
		s.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		return true
	}}
	faultRSTInternal = holdFault{"RST_STREAM INTERNAL_ERROR", func(s *h2Server, id uint32) bool {
		s.fr.WriteRSTStream(id, http2.ErrCodeInternal)
		return true
	}}
	faultGoAway = holdFault{"GOAWAY and close", func(s *h2Server, id uint32) bool {
		s.fr.WriteGoAway(id, http2.ErrCodeNo, nil)
		return false
	}}
)

// TestHoldbackBackendFailsMidMessage: a backend sends its response
// HEADERS, k complete messages and half of the next, waits until its peer
// has read them (a PING acknowledged), then fails: it closes the
// connection, resets the stream, or sends GOAWAY and closes. A grpc-go
// client through the proxy receives exactly k messages and ends with the
// code a grpc-go client connected straight to the same backend ends with:
// UNAVAILABLE for a lost connection, not the INTERNAL ("unexpected EOF")
// of a message cut in half.
func TestHoldbackBackendFailsMidMessage(t *testing.T) {
	const size = 3000 // a message of about 3 KiB: half of it is in one DATA frame
	msg := payloadMsg(size)
	faults := []holdFault{faultClose, faultRSTCancel, faultRSTInternal, faultGoAway}
	calls := []struct {
		name  string
		unary bool
		k     int
	}{
		{"unary", true, 0},
		{"unary after a whole message", true, 1},
		{"server streaming", false, 0},
		{"server streaming after 3 messages", false, 3},
	}
	for _, fault := range faults {
		for _, call := range calls {
			t.Run(fault.name+"/"+call.name, func(t *testing.T) {
				verifyNoLeaks(t)
				bad := rawBackend(t, halfMessageH2(msg, call.k, [8]byte{'h', 'o', 'l', 'd'}, fault.do))
				e := newEnv(t, envOpts{backends: 1})
				e.setBackends(bad)
				ctx := testkit.Context(t, 30*time.Second)
				direct := e.dial(bad)
				want := callRaw(ctx, direct, call.unary)
				got := callRaw(ctx, e.cc, call.unary)
				wantK := call.k
				if call.unary && wantK > 0 && want.code != codes.OK {
					wantK = 0 // a failed unary call returns no message
				}
				if want.msgs != wantK {
					t.Fatalf("direct client: %d messages then %v, want %d messages (the backend is not what the test assumes)", want.msgs, want.err, wantK)
				}
				if (fault.name == "connection closed" || fault.name == "GOAWAY and close") && want.code != codes.Unavailable {
					t.Fatalf("direct client ended with %v, want UNAVAILABLE (the backend is not what the test assumes)", want.err)
				}
				if got.msgs != want.msgs || got.code != want.code {
					t.Errorf("through the proxy: %d messages then %v; direct: %d messages then %v", got.msgs, got.err, want.msgs, want.err)
				}
			})
		}
	}
}

// splitBackend answers every call with the messages of bodies sizes, the
// response payload cut into DATA frames at the offsets the request's
// x-split header lists (comma-separated, increasing), then grpc-status 0.
func splitBackend(sizes []int) func(net.Conn) {
	var payload []byte
	for _, n := range sizes {
		payload = append(payload, payloadMsg(n)...)
	}
	return func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		s.buffered() // a new Framer, which must decode header blocks
		s.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		s.serve(func(f http2.Frame) bool {
			h, ok := f.(*http2.MetaHeadersFrame)
			if !ok {
				return true
			}
			var cuts []int
			for _, hf := range h.RegularFields() {
				if hf.Name != "x-split" || hf.Value == "" {
					continue
				}
				for _, c := range strings.Split(hf.Value, ",") {
					n, _ := strconv.Atoi(c)
					cuts = append(cuts, n)
				}
			}
			writeGRPCHeaders(s.fr, h.StreamID)
			from := 0
			for _, c := range append(cuts, len(payload)) {
				if c > from {
					s.fr.WriteData(h.StreamID, false, payload[from:c])
					from = c
				}
			}
			writeOKTrailers(s.fr, h.StreamID)
			return true
		})
	}
}

// TestHoldbackSplitMessages: a response of messages of several sizes,
// cut into DATA frames at every byte offset (inside the 5-byte prefixes
// too), into one frame per byte, and at random offsets, reaches the client
// intact: each message whole, in order, none lost or added. With the
// default bound all the messages are held while incomplete; with a bound
// of 16 bytes the larger ones go on as they arrive beside held small ones.
func TestHoldbackSplitMessages(t *testing.T) {
	sizes := []int{0, 1, 4, 37, 300, 2}
	var total int
	for _, n := range sizes {
		total += len(payloadMsg(n))
	}
	// The split plans: every single cut, every byte its own frame, and
	// random cuts (a fixed seed, so a failure repeats).
	var plans [][]int
	for c := 1; c < total; c++ {
		plans = append(plans, []int{c})
	}
	var each []int
	for c := 1; c < total; c++ {
		each = append(each, c)
	}
	plans = append(plans, each)
	rng := rand.New(rand.NewPCG(9, 9))
	for range 100 {
		set := map[int]bool{}
		for range 1 + rng.IntN(6) {
			set[1+rng.IntN(total-1)] = true
		}
		var cuts []int
		for c := 1; c < total; c++ {
			if set[c] {
				cuts = append(cuts, c)
			}
		}
		plans = append(plans, cuts)
	}
	for _, bound := range []int{0, 16} {
		t.Run(fmt.Sprintf("bound %d", bound), func(t *testing.T) {
			verifyNoLeaks(t)
			bad := rawBackend(t, splitBackend(sizes))
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.ResponseHoldback = bound }})
			e.setBackends(bad)
			ctx := testkit.Context(t, 120*time.Second)
			for _, cuts := range plans {
				var b strings.Builder
				for i, c := range cuts {
					if i > 0 {
						b.WriteByte(',')
					}
					b.WriteString(strconv.Itoa(c))
				}
				cctx := metadata.AppendToOutgoingContext(ctx, "x-split", b.String())
				st, err := e.client.StreamingOutputCall(cctx, &testgrpc.StreamingOutputCallRequest{})
				if err != nil {
					t.Fatalf("cuts %v: %v", cuts, err)
				}
				msgs, err := drain(st.Recv)
				if err != nil {
					t.Fatalf("cuts %v: %d messages then %v", cuts, len(msgs), err)
				}
				if len(msgs) != len(sizes) {
					t.Fatalf("cuts %v: got %d messages, want %d", cuts, len(msgs), len(sizes))
				}
				for i, m := range msgs {
					want := payloadMsg(sizes[i])
					if got := grpcMsg(m); !bytes.Equal(got, want) {
						t.Fatalf("cuts %v: message %d differs: got %d bytes, want %d", cuts, i, len(got), len(want))
					}
				}
			}
		})
	}
}

// TestHoldbackLargeMessages: through real grpc-go backends, messages
// below, at and above the bound (128 KiB; a 128 KiB body is a few bytes
// over it encoded), and above the backend stream's initial window (so that
// holding them needs the window raised), arrive intact,
// also for a client whose fixed 64 KiB window makes the proxy wait for it;
// and once the calls are over the connection's buffer budget and backend
// windows are back to zero (the held buffers were counted and released).
func TestHoldbackLargeMessages(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 60*time.Second)
	sizes := []int32{100, 40 << 10, 64 << 10, 128<<10 - 20, 128 << 10, 200 << 10, 1 << 20, 3}
	var params []*testgrpc.ResponseParameters
	for _, n := range sizes {
		params = append(params, &testgrpc.ResponseParameters{Size: n})
	}
	slow := fixedWindowConn(t, e.addr, 65535)
	for _, c := range []struct {
		name string
		cc   *grpc.ClientConn
	}{{"default windows", e.cc}, {"64 KiB windows", slow}} {
		for range 3 {
			st, err := testgrpc.NewTestServiceClient(c.cc).StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: params})
			if err != nil {
				t.Fatal(err)
			}
			msgs, err := drain(st.Recv)
			if err != nil {
				t.Fatalf("%s: %d messages then %v", c.name, len(msgs), err)
			}
			if len(msgs) != len(sizes) {
				t.Fatalf("%s: got %d messages, want %d", c.name, len(msgs), len(sizes))
			}
			for i, m := range msgs {
				if got := len(m.GetPayload().GetBody()); got != int(sizes[i]) {
					t.Errorf("%s: message %d has %d bytes, want %d", c.name, i, got, sizes[i])
				}
			}
		}
	}
	testkit.WaitFor(ctx, t, "the buffer budget and backend windows to be given back", func() bool {
		return srv.MaxBufferedBytes() == 0 && srv.MaxBackendWindows() == 0 && srv.MaxWindowGrowth() == 0
	})
}

// TestHoldbackShareFull: with a small buffer budget, the window growth
// that holding large messages needs runs out for some of the streams of a
// connection; their messages then go on as they arrive. Every message of
// 16 concurrent streams arrives intact, none waits for ever, and the
// budget is all given back.
func TestHoldbackShareFull(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 2, pcfg: func(c *proxy.Config) { c.MaxConnBufferedBytes = 1 << 20 }})
	srv := e.srv.(*proxy.Server)
	ctx := testkit.Context(t, 60*time.Second)
	const streams, perStream, size = 16, 8, 120 << 10
	var params []*testgrpc.ResponseParameters
	for range perStream {
		params = append(params, &testgrpc.ResponseParameters{Size: size})
	}
	errs := make(chan error, streams)
	for range streams {
		go func() {
			st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: params})
			if err != nil {
				errs <- err
				return
			}
			msgs, err := drain(st.Recv)
			switch {
			case err != nil:
				errs <- fmt.Errorf("%d messages then %w", len(msgs), err)
			case len(msgs) != perStream:
				errs <- fmt.Errorf("got %d messages, want %d", len(msgs), perStream)
			default:
				for i, m := range msgs {
					if n := len(m.GetPayload().GetBody()); n != size {
						errs <- fmt.Errorf("message %d has %d bytes, want %d", i, n, size)
						return
					}
				}
				errs <- nil
			}
		}()
	}
	for range streams {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	testkit.WaitFor(ctx, t, "the buffer budget and backend windows to be given back", func() bool {
		return srv.MaxBufferedBytes() == 0 && srv.MaxBackendWindows() == 0 && srv.MaxWindowGrowth() == 0
	})
}
