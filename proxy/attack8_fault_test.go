package proxy_test

import (
	"bytes"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

// TestAttack8DiesMidMessageShapes: the shaped backend dies (closes, resets
// the stream, GOAWAY and close) after cut bytes of its payload, cut in a
// prefix, in a held message's body, at a boundary, and inside a message
// over the hold-back bound, with frames of odd shapes, toward clients
// that read slowly. The client must receive exactly the complete messages
// before the cut, each intact, then an error status: UNAVAILABLE for a
// lost connection when no part of the torn message reached it.
func TestAttack8DiesMidMessageShapes(t *testing.T) {
	verifyNoLeaks(t)
	const count = 13
	payload := seededPayload(7, count, attack8Sizes)
	// Message boundaries.
	var bounds []int
	for off := 0; off < len(payload); {
		bounds = append(bounds, off)
		off += 5 + int(uint32(payload[off+1])<<24|uint32(payload[off+2])<<16|uint32(payload[off+3])<<8|uint32(payload[off+4]))
	}
	complete := func(cut int) int {
		k := 0
		for i, b := range bounds {
			if i+1 < len(bounds) && bounds[i+1] <= cut {
				k = i + 1
			} else if i+1 == len(bounds) && len(payload) <= cut {
				k = i + 1
			}
			_ = b
		}
		return k
	}
	var cuts []int
	for i, b := range bounds {
		cuts = append(cuts, b, b+2, b+5)
		if i+1 < len(bounds) {
			cuts = append(cuts, (b+bounds[i+1])/2, bounds[i+1]-1)
		}
	}
	// over the bound: messages 9 and 10 are relayed as they arrive.
	bigMsg := 10
	for _, fault := range []string{"close", "goaway", "rst"} {
		t.Run(fault, func(t *testing.T) {
			const workers = 8
			type worker struct{ cc *grpc.ClientConn }
			ws := make(chan worker, workers)
			for range workers {
				addr := shapedBackend(t, func(fields []hpack.HeaderField) shapedPlan {
					shape := fieldInt(fields, "x-shape")
					cut := fieldInt(fields, "x-cut")
					return shapedPlan{payload: payload, shapes: attack8Shapes[shape], cut: cut, fault: fault}
				})
				srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog})
				if err != nil {
					t.Fatal(err)
				}
				ln := serveProxy(t, srv)
				ws <- worker{fixedWindowConn(t, ln.Addr().String(), 64<<10, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30)))}
			}
			ctx := testkit.Context(t, 90*time.Second)
			var wg sync.WaitGroup
			errs := make(chan error, 1000)
			for _, shape := range []int{0, 2, 3, 5, 6} {
				for _, cut := range cuts {
					if cut > len(payload) || cut <= 0 {
						continue
					}
					if shape == 0 && cut > 40000 {
						continue // one byte a frame: slow
					}
					wg.Add(1)
					w := <-ws
					cc := w.cc
					go func() {
						defer wg.Done()
						defer func() { ws <- w }()
						cctx := metadata.AppendToOutgoingContext(ctx, "x-shape", strconv.Itoa(shape), "x-cut", strconv.Itoa(cut))
						st, err := cc.NewStream(cctx, &grpc.StreamDesc{ServerStreams: true}, "/x.Y/Z", grpc.ForceCodec(rawBytes{}))
						req := []byte{}
						if err == nil {
							err = st.SendMsg(&req)
						}
						if err == nil {
							err = st.CloseSend()
						}
						if err != nil {
							errs <- err
							return
						}
						want := complete(cut)
						got := 0
						var rerr error
						for i := 0; ; i++ {
							if i%2 == 0 {
								time.Sleep(time.Millisecond)
							}
							var m []byte
							if rerr = st.RecvMsg(&m); rerr != nil {
								break
							}
							if i >= count || !bytes.Equal(m, seededMessage(7, i, attack8Sizes[i%len(attack8Sizes)])) {
								errs <- fmt.Errorf("shape %d cut %d: message %d (%d B) is not the one sent", shape, cut, i, len(m))
								return
							}
							got++
						}
						code := status.Code(rerr)
						torn := cut > bounds[bigMsg-1] && cut < bounds[bigMsg+1] // messages 9 and 10 are over the bound
						switch {
						case got != want:
							errs <- fmt.Errorf("shape %d cut %d (%s): %d messages then %v, want %d", shape, cut, fault, got, rerr, want)
						case code == codes.OK || code == codes.DeadlineExceeded:
							errs <- fmt.Errorf("shape %d cut %d (%s): ended %v", shape, cut, fault, rerr)
						case fault != "rst" && !torn && code != codes.Unavailable:
							errs <- fmt.Errorf("shape %d cut %d (%s): ended %v, want UNAVAILABLE", shape, cut, fault, rerr)
						}
					}()
				}
			}
			wg.Wait()
			close(errs)
			n := 0
			for err := range errs {
				if n++; n < 30 {
					t.Error(err)
				}
			}
		})
	}
}
