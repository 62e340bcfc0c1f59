package proxy_test

import (
	"bytes"
	"context"
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

	"github.com/streamlb/streamlb/proxy"
)

// TestAttack8DeadlineMidStream: calls with short deadlines stream large
// messages (held back, and over the bound) in frames of odd shapes to
// clients that read slowly; the deadline passes while messages are queued,
// held and partly written. Every message a client receives must be the
// one sent, and each call must end DEADLINE_EXCEEDED (or OK), never
// INTERNAL from a torn message.
func TestAttack8DeadlineMidStream(t *testing.T) {
	verifyNoLeaks(t)
	const count = 40
	sizes := []int{70000, 131073, 5, 200000, 131072, 16379, 0}
	addr := shapedBackend(t, func(fields []hpack.HeaderField) shapedPlan {
		seed := fieldInt(fields, "x-seed")
		shape := fieldInt(fields, "x-shape")
		return shapedPlan{payload: seededPayload(uint64(seed), count, sizes), shapes: attack8Shapes[shape], cut: -1}
	})
	srv, err := proxy.New(proxy.Config{Picker: pickerTo(addr), Logger: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	cc := fixedWindowConn(t, ln.Addr().String(), 64<<10, grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30)))
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for shape := 1; shape < len(attack8Shapes); shape++ {
		for c := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				seed := 100*shape + c
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(60+40*c)*time.Millisecond)
				defer cancel()
				cctx := metadata.AppendToOutgoingContext(ctx, "x-seed", strconv.Itoa(seed), "x-shape", strconv.Itoa(shape))
				st, err := cc.NewStream(cctx, &grpc.StreamDesc{ServerStreams: true}, "/x.Y/Z", grpc.ForceCodec(rawBytes{}))
				req := []byte{}
				if err == nil {
					err = st.SendMsg(&req)
				}
				if err == nil {
					err = st.CloseSend()
				}
				i := 0
				for ; err == nil; i++ {
					time.Sleep(3 * time.Millisecond)
					var got []byte
					if err = st.RecvMsg(&got); err != nil {
						break
					}
					if i >= count || !bytes.Equal(got, seededMessage(uint64(seed), i, sizes[i%len(sizes)])) {
						errs <- fmt.Errorf("shape %d call %d: message %d (%d B) is not the one sent", shape, c, i, len(got))
						return
					}
				}
				if code := status.Code(err); code != codes.DeadlineExceeded && !(code == codes.OK && i == count) && err.Error() != "EOF" {
					errs <- fmt.Errorf("shape %d call %d: after %d messages: %v", shape, c, i, err)
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
