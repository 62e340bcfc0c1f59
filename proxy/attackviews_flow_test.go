package proxy_test

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// rawStreamServer is a grpc-go server (it keeps to the proxy's windows)
// whose handler reads a request of (seed, count, sizes...) as uint32s and
// streams count seeded messages of the sizes, cycled.
func rawStreamServer(t *testing.T) string {
	return serveRawGRPC(t, func(ss grpc.ServerStream) error {
		var req []byte
		if err := ss.RecvMsg(&req); err != nil {
			return err
		}
		seed := binary.BigEndian.Uint32(req)
		count := int(binary.BigEndian.Uint32(req[4:]))
		var sizes []int
		for p := req[8:]; len(p) >= 4; p = p[4:] {
			sizes = append(sizes, int(binary.BigEndian.Uint32(p)))
		}
		for i := range count {
			m := seededMessage(uint64(seed), i, sizes[i%len(sizes)])
			if err := ss.SendMsg(&m); err != nil {
				return err
			}
		}
		return nil
	})
}

// TestAttackViewsHoldbackSmallWindows: with small backend stream windows
// (BackendStreamWindow, BackendMaxStreamWindow) and ResponseHoldback at
// its default (shrunk to fit) or at the largest value accepted, messages
// of sizes right at the hold-back bound, and a little under and over, are
// streamed by a grpc-go backend through the proxy to clients that read.
// With half-window crediting and the 2n+1 hold target, a held message must
// always be able to arrive whole: no call may stall, and every byte must
// arrive as sent.
func TestAttackViewsHoldbackSmallWindows(t *testing.T) {
	verifyNoLeaks(t)
	addr := rawStreamServer(t)
	type wcase struct{ w0, wmax int32 }
	for _, w := range []wcase{{256, 256}, {256, 1024}, {1024, 1024}, {4096, 9000}, {16 << 10, 16 << 10}, {16 << 10, 40000}, {65535, 65535}, {16 << 10, 262154}} {
		for _, explicit := range []bool{false, true} {
			rh := 0
			if explicit {
				rh = int((int64(w.wmax)-1)/2 - 5)
			}
			name := fmt.Sprintf("w%d-%d/rh%d", w.w0, w.wmax, rh)
			t.Run(name, func(t *testing.T) {
				cfg := proxy.Config{Picker: pickerTo(addr), Logger: quietLog,
					BackendStreamWindow: w.w0, BackendMaxStreamWindow: w.wmax, ResponseHoldback: rh}
				srv, err := proxy.New(cfg)
				if err != nil {
					t.Fatal(err)
				}
				ln := serveProxy(t, srv)
				bound := rh
				if bound == 0 {
					bound = max(0, min(proxy.DefaultResponseHoldback, int((int64(w.wmax)-1)/2)-5))
				}
				sizes := []int{bound, bound - 1, bound + 1, bound - 5, 4096, bound, 2 * bound, bound}
				cc, err := grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(insecureCreds()),
					grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30)))
				if err != nil {
					t.Fatal(err)
				}
				defer cc.Close()
				ctx := testkit.Context(t, 15*time.Second)
				var wg sync.WaitGroup
				var total atomic.Int64
				defer func() { t.Logf("%d bytes received", total.Load()) }()
				errs := make(chan error, 4)
				for c := range 4 {
					wg.Add(1)
					go func() {
						defer wg.Done()
						seed := uint32(100 + c)
						const count = 12
						req := binary.BigEndian.AppendUint32(nil, seed)
						req = binary.BigEndian.AppendUint32(req, count)
						for _, s := range sizes {
							req = binary.BigEndian.AppendUint32(req, uint32(max(s, 0)))
						}
						st, err := cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/x.Y/Z", grpc.ForceCodec(rawBytes{}))
						if err == nil {
							err = st.SendMsg(&req)
						}
						if err == nil {
							err = st.CloseSend()
						}
						for i := 0; err == nil && i < count; i++ {
							var got []byte
							if err = st.RecvMsg(&got); err != nil {
								err = fmt.Errorf("message %d (%d B): %v", i, max(sizes[i%len(sizes)], 0), err)
								break
							}
							total.Add(int64(len(got)))
							if string(got) != string(seededMessage(uint64(seed), i, max(sizes[i%len(sizes)], 0))) {
								err = fmt.Errorf("message %d: %d bytes differ from those sent", i, len(got))
							}
						}
						if err != nil {
							errs <- fmt.Errorf("call %d: %w", c, err)
						}
					}()
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Error(err)
				}
			})
		}
	}
}

func insecureCreds() credentials.TransportCredentials { return insecure.NewCredentials() }
