package proxy_test

import (
	"bytes"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestAtk26StuckConsumerOfServerStream: a client opens a server stream
// without a grpc-timeout, its request complete, and then takes none of
// the answer (it grants no window, as a consumer stuck behind a full
// buffer). --request-idle-timeout (400 ms here) bounded such a consumer
// of a bidi stream, whose request is not complete, but not one of a
// server stream: the stream, the answer's bytes and the backend's
// handler (blocked in Send, its slot taken) were held for as long as the
// client kept its connection. Now both end DEADLINE_EXCEEDED after the
// timeout and the backend's handler is released; a client that takes
// answer bytes, however slowly, and a call whose backend has not
// answered yet (nothing waits for the client) are left alone.
func TestAtk26StuckConsumerOfServerStream(t *testing.T) {
	verifyNoLeaks(t)
	const idle = 400 * time.Millisecond
	for _, tc := range []struct {
		name  string
		size  int32  // of each of the ten answer messages
		grant uint32 // window granted every 100 ms; 0: none
		hang  bool   // the backend answers nothing
		ends  bool   // the call must end within 3 s
	}{
		{name: "stuck answering", size: 20000, ends: true},
		{name: "stuck answered", size: 1000, ends: true},
		{name: "slow reader", size: 20000, grant: 2000},
		{name: "no answer yet", hang: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			released := make(chan struct{})
			e := newEnv(t, envOpts{backends: 1, pcfg: func(c *proxy.Config) { c.RequestIdleTimeout = idle },
				tscfg: func(_ int, c *testserver.Config) {
					c.StreamingOutputCallF = func(in *testgrpc.StreamingOutputCallRequest, st testgrpc.TestService_StreamingOutputCallServer) error {
						defer close(released)
						if md, _ := metadata.FromIncomingContext(st.Context()); len(md.Get("x-hang")) > 0 {
							<-st.Context().Done()
							return st.Context().Err()
						}
						for _, p := range in.ResponseParameters {
							if err := st.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: make([]byte, p.Size)}}); err != nil {
								return err
							}
						}
						return nil
					}
				}})
			r := dialRawPreface(t, e.addr)
			r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
			var hb bytes.Buffer
			enc := hpack.NewEncoder(&hb)
			f := []string{":method", "POST", ":scheme", "http", ":path", "/grpc.testing.TestService/StreamingOutputCall", ":authority", "x",
				"content-type", "application/grpc", "te", "trailers"}
			if tc.hang {
				f = append(f, "x-hang", "1")
			}
			for i := 0; i < len(f); i += 2 {
				enc.WriteField(hpack.HeaderField{Name: f[i], Value: f[i+1]})
			}
			r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true})
			var ps []*testgrpc.ResponseParameters
			for range 10 {
				ps = append(ps, &testgrpc.ResponseParameters{Size: tc.size})
			}
			r.fr.WriteData(1, true, grpcMsg(&testgrpc.StreamingOutputCallRequest{ResponseParameters: ps}))
			start := time.Now()
			frames := make(chan http2.Frame)
			go func() {
				defer close(frames)
				for {
					fr, err := r.fr.ReadFrame()
					if err != nil {
						return // the test closed the connection, or the proxy did
					}
					frames <- fr
				}
			}()
			defer func() {
				r.nc.Close()
				for range frames {
				}
			}()
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			wait := time.After(3 * time.Second)
			for {
				select {
				case fr, ok := <-frames:
					if !ok {
						t.Fatal("connection ended before the call")
					}
					end := false
					switch fr := fr.(type) {
					case *http2.PingFrame:
						if !fr.IsAck() {
							r.fr.WritePing(true, fr.Data) // the client is alive
						}
					case *http2.RSTStreamFrame:
						end = fr.StreamID == 1
					case *http2.MetaHeadersFrame:
						if end = fr.StreamID == 1 && fr.StreamEnded(); end && field(fr, "grpc-status") != "4" {
							t.Errorf("the call ended with grpc-status %q (%q), want 4 (DEADLINE_EXCEEDED)", field(fr, "grpc-status"), field(fr, "grpc-message"))
						}
					case *http2.GoAwayFrame:
						t.Fatalf("GOAWAY %v before the call ended", fr.ErrCode)
					}
					if !end {
						continue
					}
					if !tc.ends {
						t.Fatalf("the call ended after %v; a client taking its answer, or one whose backend has not answered, is not idle", time.Since(start).Round(time.Millisecond))
					}
					select {
					case <-released:
					case <-time.After(2 * time.Second):
						t.Fatal("the backend's handler still runs 2 s after the call ended")
					}
					return
				case <-tick.C:
					if tc.grant > 0 {
						r.fr.WriteWindowUpdate(0, tc.grant)
						r.fr.WriteWindowUpdate(1, tc.grant)
					}
				case <-wait:
					if tc.ends {
						t.Fatalf("the call did not end within 3 s; --request-idle-timeout is %v", idle)
					}
					return
				}
			}
		})
	}
}
