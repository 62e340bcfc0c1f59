package proxy_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk26UploadToBackendNotReading: one client connection uploads on
// 16 streams to a backend whose handler never reads (its grpc-go server
// grants a fixed 64 KiB window per stream, so it holds at most that). The
// bytes the client got off its hands, less what the backend and the
// client's own transport can hold (64 KiB each per stream, plus the
// message being sent), are held by the proxy, and must stay within the
// documented per-connection budget, --max-conn-buffer (16 MiB). The
// grpc-proxy engine, whose grpc-go server grew each stream's window by
// BDP, held at least 39 MiB here; with its fixed 256 KiB stream windows
// it holds 16 x (256 KiB + one 64 KiB message), 5 MiB: its bound
// (ReferenceConfig), reached.
func TestAtk26UploadToBackendNotReading(t *testing.T) {
	verifyNoLeaks(t)
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			const streams, msg, sends = 16, 64 << 10, 200
			e := newEnv(t, envOpts{backends: 1, engine: engine, tscfg: func(_ int, c *testserver.Config) {
				c.ServerOptions = []grpc.ServerOption{grpc.InitialWindowSize(64 << 10), grpc.InitialConnWindowSize(64 << 10)}
				c.StreamingInputCallF = func(st testgrpc.TestService_StreamingInputCallServer) error {
					<-st.Context().Done()
					return st.Context().Err()
				}
			}})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var sent atomic.Int64
			var wg sync.WaitGroup
			for range streams {
				st, err := e.client.StreamingInputCall(ctx)
				if err != nil {
					t.Fatal(err)
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					req := &testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, msg)}}
					for range sends {
						if st.Send(req) != nil {
							return
						}
						sent.Add(msg)
					}
				}()
			}
			// Wait until nothing moves for a while: every stream is held
			// back by the proxy, or has sent everything.
			last := int64(-1)
			for sent.Load() != last {
				last = sent.Load()
				time.Sleep(300 * time.Millisecond)
			}
			outside := int64(streams) * (64<<10 + 64<<10 + msg)
			held := sent.Load() - outside
			t.Logf("%s: client sent %d KiB; at most %d KiB of it in the backend and the client's transport, so the proxy holds at least %d KiB", engine, sent.Load()>>10, outside>>10, held>>10)
			if held > proxy.DefaultMaxConnBufferedBytes {
				t.Errorf("the proxy holds at least %d KiB of one connection's uploads, over the per-connection budget of %d KiB", held>>10, proxy.DefaultMaxConnBufferedBytes>>10)
			}
			cancel()
			wg.Wait()
		})
	}
}
