package proxy_test

import (
	"bytes"
	"encoding/binary"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// stallMidMessageH2 is a raw HTTP/2 backend that answers a server-streaming
// call with k messages msg, then the first bytes of one more, cut into
// DATA frames at cuts (offsets into msg, increasing, a negative one from
// its end; the last is where it stops), then a PING. Once the PING is acknowledged (the peer read it all)
// it sends on stalled, then sends nothing more: it keeps the connection
// open and reads until its peer closes it, or closes it itself if cut is
// set, as a backend connection cut under a direct client.
func stallMidMessageH2(msg []byte, k int, cuts []int, stalled chan<- struct{}, cut bool) func(net.Conn) {
	ping := [8]byte{'s', 't', 'a', 'l', 'l'}
	return pingedH2(ping, func(s *h2Server, id uint32) {
		writeGRPCHeaders(s.fr, id)
		for range k {
			for p := msg; len(p) > 0; {
				n := min(len(p), 16<<10) // the largest frame a peer must take
				s.fr.WriteData(id, false, p[:n])
				p = p[n:]
			}
		}
		from := 0
		for _, c := range cuts {
			if c < 0 {
				c += len(msg)
			}
			s.fr.WriteData(id, false, msg[from:c])
			from = c
		}
	}, func(*h2Server, uint32) bool {
		select {
		case stalled <- struct{}{}:
		default:
		}
		return !cut
	})
}

// TestDrainTimeoutMidHeldMessage: a backend leaves the set (RetainBackends)
// while a server-streaming call on it has sent k complete messages and
// the first part of the next, over several DATA frames, and then stalls;
// the drain timeout (Config.DrainTimeout) passes and the proxy cuts the
// backend connection. The incomplete message is within ResponseHoldback,
// so the proxy holds it back: a grpc-go client through the proxy must
// receive the k messages, whole, and then UNAVAILABLE naming the drain
// timeout, as a grpc-go client whose own connection to that backend is cut
// gets UNAVAILABLE after the k messages; never INTERNAL, the "unexpected
// EOF" of a message cut in half.
func TestDrainTimeoutMidHeldMessage(t *testing.T) {
	const drainTimeout = 300 * time.Millisecond
	every := func(step, upTo int) []int {
		var cuts []int
		for c := step; c < upTo; c += step {
			cuts = append(cuts, c)
		}
		return append(cuts, upTo)
	}
	cases := []struct {
		name   string
		k      int   // complete messages before the cut one
		size   int   // the messages' body
		cuts   []int // where the last message's DATA frames end
		unread bool  // the client calls Recv only after the cut
	}{
		{"inside the prefix", 2, 10000, []int{2, 3}, false},
		{"prefix and part of the body", 2, 10000, []int{5, 1000, 3000, 6000}, false},
		{"all but the last byte", 2, 10000, []int{4000, 8000, -1}, false},
		{"frames held as views", 2, 30000, []int{5, 6000, 12000, 20000}, false},
		{"100 KiB in 16 KiB frames", 2, 100 << 10, every(16<<10, 90000), false},
		{"messages before it unread", 2, 30000, []int{5, 6000, 12000, 20000}, true},
		{"the first message", 0, 30000, []int{5, 6000, 12000, 20000}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			msg, k := payloadMsg(tc.size), tc.k
			verifyNoLeaks(t)
			ctx := testkit.Context(t, 30*time.Second)

			// A grpc-go client connected straight to such a backend,
			// whose connection is cut where the drain cuts it.
			directStalled := make(chan struct{}, 1)
			direct := rawBackend(t, stallMidMessageH2(msg, k, tc.cuts, directStalled, true))
			// Wide windows: the raw backend does not watch them.
			dcc := fixedWindowConn(t, direct, 1<<30)
			dst, err := testgrpc.NewTestServiceClient(dcc).StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
			if err != nil {
				t.Fatal(err)
			}
			wantMsgs, wantErr := drain(dst.Recv)
			if len(wantMsgs) != k || status.Code(wantErr) != codes.Unavailable {
				t.Fatalf("direct client: %d messages then %v, want %d then UNAVAILABLE (the backend is not what the test assumes)", len(wantMsgs), wantErr, k)
			}

			stalled := make(chan struct{}, 1)
			bad := rawBackend(t, stallMidMessageH2(msg, k, tc.cuts, stalled, false))
			// The raw backend does not watch the windows: the stream's is wide.
			srv, err := proxy.New(proxy.Config{Picker: pickerTo(bad), Logger: quietLog, DrainTimeout: drainTimeout,
				BackendStreamWindow: 512 << 10})
			if err != nil {
				t.Fatal(err)
			}
			ln := serveProxy(t, srv)
			st, err := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String())).StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
			if err != nil {
				t.Fatal(err)
			}
			var got []*testgrpc.StreamingOutputCallResponse
			for !tc.unread && len(got) < k {
				m, err := st.Recv()
				if err != nil {
					t.Fatalf("message %d of %d before the drain: %v", len(got)+1, k, err)
				}
				got = append(got, m)
			}
			select {
			case <-stalled:
			case <-ctx.Done():
				t.Fatal("the proxy never read the backend's partial message")
			}
			srv.RetainBackends(nil) // the backend leaves the set
			start := time.Now()
			rest, err := drain(st.Recv)
			got = append(got, rest...)
			t.Logf("through the proxy: %d messages, then %v, %v after the backend left; direct: %d messages, then %v",
				len(got), err, time.Since(start).Round(time.Millisecond), len(wantMsgs), wantErr)
			if len(got) != k {
				t.Errorf("got %d messages, want %d", len(got), k)
			}
			for i, m := range got {
				if !bytes.Equal(grpcMsg(m), msg) {
					t.Errorf("message %d is not the backend's", i)
				}
			}
			if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "drain timeout") {
				t.Errorf("call ended with %v, want UNAVAILABLE naming the drain timeout", err)
			}
		})
	}
}

// TestDrainTimeoutMidStream: a grpc-go backend streams messages of 100
// KB (within the default ResponseHoldback, over several DATA frames and
// more than the backend stream window) without end; the backend leaves
// the set and the drain timeout cuts the call wherever it is, most
// likely in the middle of a message. The client, reading at full speed or
// slowly, must get whole messages, each the backend's, then UNAVAILABLE
// naming the drain timeout, never INTERNAL.
func TestDrainTimeoutMidStream(t *testing.T) {
	const drainTimeout = 300 * time.Millisecond
	addr := rawStreamServer(t)
	for _, tc := range []struct {
		name   string
		size   uint32
		slow   time.Duration // a pause between the client's reads
		window int32         // the client's fixed windows; 0: grpc-go's own
		pause  bool          // the client reads nothing from the drain to the cut
	}{
		{"fast reader", 100_000, 0, 0, false},
		{"slow reader", 100_000, 5 * time.Millisecond, 0, false},
		{"fast reader, 20 KB", 20_000, 0, 0, false},
		{"slow reader, 20 KB", 20_000, 5 * time.Millisecond, 0, false},
		{"paused reader", 100_000, 0, 0, true},
		{"paused reader, 64 KiB windows", 100_000, 0, 64 << 10, true},
		{"paused reader, 20 KB, 64 KiB windows", 20_000, 0, 64 << 10, true},
		{"paused reader, 1 MiB windows", 100_000, 0, 1 << 20, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			ctx := testkit.Context(t, 30*time.Second)
			srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog, DrainTimeout: drainTimeout})
			if err != nil {
				t.Fatal(err)
			}
			ln := serveProxy(t, srv)
			var cc *grpc.ClientConn
			if tc.window > 0 {
				cc = fixedWindowConn(t, ln.Addr().String(), tc.window)
			} else {
				cc = e2eConn(t, ln.Addr().String())
			}
			const seed = 7
			st, err := cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/x.Y/Z", grpc.ForceCodec(rawBytes{}))
			if err != nil {
				t.Fatal(err)
			}
			// rawStreamServer's request: seed, count, size.
			req := binary.BigEndian.AppendUint32(nil, seed)
			req = binary.BigEndian.AppendUint32(req, 1<<30)
			req = binary.BigEndian.AppendUint32(req, tc.size)
			if err := st.SendMsg(&req); err != nil {
				t.Fatal(err)
			}
			st.CloseSend()
			n := 0
			for ; ; n++ {
				var got []byte
				err = st.RecvMsg(&got)
				if err != nil {
					break
				}
				if !bytes.Equal(got, seededMessage(seed, n, int(tc.size))) {
					t.Fatalf("message %d is not the backend's", n)
				}
				if n == 5 {
					srv.RetainBackends(nil) // the backend leaves the set
					if tc.pause {
						testkit.WaitFor(ctx, t, "the drain timeout to cut the backend connection", func() bool { return srv.BackendConns(addr) == 0 })
					}
				}
				if tc.slow > 0 {
					time.Sleep(tc.slow)
				}
			}
			t.Logf("%d messages, then %v", n, err)
			if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "drain timeout") {
				t.Errorf("call ended with %v after %d messages, want UNAVAILABLE naming the drain timeout", err, n)
			}
		})
	}
}

// e2eConn opens a client connection to addr with grpc-go's own windows,
// closed at cleanup.
func e2eConn(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}
