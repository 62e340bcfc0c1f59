package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestH2llUploadsCutKeepConnWindow: rounds of 8 concurrent client-streaming
// uploads, each sending as fast as the windows allow, are cut in the
// middle: by the drain timeout of their backend, which left the set, or
// by the backend answering early (an error after 64 KiB, the rest of the
// upload unread). The client keeps sending until it learns, so DATA
// arrives for streams already ended; the connection's window must get it
// back all the same. After 3 rounds (about 24 stream windows of DATA
// dropped, more than the 4 MiB connection window), an 8 MiB upload and a
// unary call on the same client connection must still go through.
func TestH2llUploadsCutKeepConnWindow(t *testing.T) {
	for _, how := range []string{"drain timeout", "early answer"} {
		t.Run(how, func(t *testing.T) {
			verifyNoLeaks(t)
			early := func(st testgrpc.TestService_StreamingInputCallServer) error {
				got := 0
				for got < 64<<10 {
					m, err := st.Recv()
					if err != nil {
						return err
					}
					got += len(m.GetPayload().GetBody())
				}
				return status.Error(codes.FailedPrecondition, "enough")
			}
			var backends []*testserver.Server
			for i := 0; i < 4; i++ {
				cfg := testserver.Config{Name: fmt.Sprint("b", i), Logger: quietLog}
				if how == "early answer" && i < 3 {
					cfg.StreamingInputCallF = early
				}
				backends = append(backends, startTestserver(t, cfg))
			}
			var cur atomic.Int32
			srv, err := proxy.New(proxy.Config{Logger: quietLog, DrainTimeout: 150 * time.Millisecond,
				Picker: proxy.PickerFunc(func(context.Context, string) (string, func(error), error) {
					return backends[cur.Load()].Addr(), nil, nil
				})})
			if err != nil {
				t.Fatal(err)
			}
			ln := serveProxy(t, srv)
			client := testgrpc.NewTestServiceClient(e2eConn(t, ln.Addr().String()))
			ctx := testkit.Context(t, 60*time.Second)
			body := make([]byte, 32<<10)
			upload := func(ctx context.Context, total int) (int32, error) {
				st, err := client.StreamingInputCall(ctx)
				if err != nil {
					return 0, err
				}
				for sent := 0; sent < total; sent += len(body) {
					if err := st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: body}}); err != nil {
						if !errors.Is(err, io.EOF) {
							return 0, err
						}
						break
					}
				}
				r, err := st.CloseAndRecv()
				return r.GetAggregatedPayloadSize(), err
			}
			for round := 0; round < 3; round++ {
				var wg sync.WaitGroup
				errs := make(chan error, 8)
				for i := 0; i < 8; i++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						// Without end, as far as the cut is concerned.
						_, err := upload(ctx, 1<<30)
						errs <- err
					}()
				}
				if how == "drain timeout" {
					testkit.WaitFor(ctx, t, "the uploads on their backend", func() bool { return backends[round].InFlight() == 8 })
					time.Sleep(50 * time.Millisecond)
					cur.Store(int32(round + 1))
					var keep []string
					for _, b := range backends[round+1:] {
						keep = append(keep, b.Addr())
					}
					srv.RetainBackends(keep)
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					if err == nil {
						t.Fatalf("round %d: an endless upload succeeded", round)
					}
					want, msg := codes.FailedPrecondition, "enough"
					if how == "drain timeout" {
						want, msg = codes.Unavailable, "drain timeout"
					}
					if status.Code(err) != want || !strings.Contains(status.Convert(err).Message(), msg) {
						t.Errorf("round %d: a cut upload ended with %v, want %v naming %q", round, err, want, msg)
					}
				}
				if how == "early answer" {
					cur.Store(int32(round + 1))
				}
			}
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			n, err := upload(cctx, 8<<20)
			if err != nil || n != 8<<20 {
				t.Fatalf("an 8 MiB upload after the cut ones: %d bytes, %v", n, err)
			}
			if _, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{}); err != nil {
				t.Fatalf("a unary call after the cut uploads: %v", err)
			}
			testkit.WaitFor(ctx, t, "nothing held", func() bool {
				return srv.ClientStreams() == 0 && srv.MaxBufferedBytes() == 0 && srv.MaxHeldBytes() == 0
			})
		})
	}
}
