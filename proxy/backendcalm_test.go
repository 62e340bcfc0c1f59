package proxy_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// twoPicker sends UnaryCall to first (the raw backend) and every retry, and
// every other method, to second; it records the outcomes the proxy reports
// for first.
type twoPicker struct {
	first, second string
	mu            sync.Mutex
	firstDone     []error
}

func (p *twoPicker) Pick(ctx context.Context, method string) (string, func(error), error) {
	if method == unaryPath {
		return p.first, func(err error) {
			p.mu.Lock()
			p.firstDone = append(p.firstDone, err)
			p.mu.Unlock()
		}, nil
	}
	return p.second, nil, nil
}

func (p *twoPicker) PickExcluding(ctx context.Context, method string, tried []string) (string, func(error), error) {
	return p.second, nil, nil
}

func (p *twoPicker) outcomes() []error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]error(nil), p.firstDone...)
}

// twoBackendProxy starts a proxy with cfg in front of raw and a testserver,
// and returns the picker and a grpc-go client of the proxy.
func twoBackendProxy(t *testing.T, raw string, cfg proxy.Config) (*twoPicker, testgrpc.TestServiceClient) {
	t.Helper()
	_, pick, client := twoBackendServer(t, raw, testserver.Config{}, cfg)
	return pick, client
}

// twoBackendServer is twoBackendProxy with the testserver's configuration
// tcfg (named "good", quiet, unless tcfg says otherwise), and the proxy
// returned too.
func twoBackendServer(t *testing.T, raw string, tcfg testserver.Config, cfg proxy.Config) (*proxy.Server, *twoPicker, testgrpc.TestServiceClient) {
	t.Helper()
	if tcfg.Name == "" {
		tcfg.Name = "good"
	}
	if tcfg.Logger == nil {
		tcfg.Logger = quietLog
	}
	ts := startTestserver(t, tcfg)
	pick := &twoPicker{first: raw, second: ts.Addr()}
	cfg.Picker, cfg.Logger = pick, quietLog
	srv, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln := serveProxy(t, srv)
	cc, err := grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return srv, pick, testgrpc.NewTestServiceClient(cc)
}

// TestBackendGlitchFloods: a backend that floods its connection with
// frames that do no work (PING, SETTINGS, acknowledgements of SETTINGS
// and PINGs the proxy never sent, one-byte WINDOW_UPDATEs, empty DATA,
// empty CONTINUATION) loses that connection to
// GOAWAY(ENHANCE_YOUR_CALM), as a client would. The call on it ends
// UNAVAILABLE, or succeeds on the other backend when its method may be
// retried; the Picker hears UNAVAILABLE for the flooding backend; the
// other backend keeps serving.
func TestBackendGlitchFloods(t *testing.T) {
	verifyNoLeaks(t)
	const budget = 100
	resp := hpackBlock(":status", "200", "content-type", "application/grpc")
	floods := []struct {
		name  string
		flood func(fr *http2.Framer, id uint32)
	}{
		{"PING", func(fr *http2.Framer, id uint32) {
			for i := range 4 * budget {
				fr.WritePing(false, [8]byte{byte(i), byte(i >> 8)})
			}
		}},
		{"SETTINGS", func(fr *http2.Framer, id uint32) {
			for range 4 * budget {
				fr.WriteSettings()
			}
		}},
		{"SETTINGS ACK", func(fr *http2.Framer, id uint32) {
			for range 4 * budget {
				fr.WriteSettingsAck()
			}
		}},
		{"PING ACK", func(fr *http2.Framer, id uint32) {
			for i := range 4 * budget {
				fr.WritePing(true, [8]byte{byte(i), byte(i >> 8)})
			}
		}},
		{"connection WINDOW_UPDATE", func(fr *http2.Framer, id uint32) {
			for range 4 * budget {
				fr.WriteWindowUpdate(0, 1<<16)
			}
		}},
		{"stream WINDOW_UPDATE", func(fr *http2.Framer, id uint32) {
			for range 4 * budget {
				fr.WriteWindowUpdate(id, 1)
			}
		}},
		{"empty DATA", func(fr *http2.Framer, id uint32) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: resp, EndHeaders: true})
			for range 4 * budget {
				fr.WriteData(id, false, nil)
			}
		}},
		{"empty CONTINUATION", func(fr *http2.Framer, id uint32) {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: resp[:1]})
			for range 4 * budget {
				fr.WriteContinuation(id, false, nil)
			}
		}},
	}
	for _, fl := range floods {
		for _, retry := range []bool{false, true} {
			name := fl.name
			if retry {
				name += " retried"
			}
			t.Run(name, func(t *testing.T) {
				goAway := make(chan http2.ErrCode, 1)
				raw := floodBackend(t, fl.flood, goAway)
				cfg := proxy.Config{MaxGlitches: budget}
				if retry {
					cfg.RetryOn = []string{unaryPath}
				}
				pick, client := twoBackendProxy(t, raw, cfg)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				_, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{})
				select {
				case code := <-goAway:
					if code != http2.ErrCodeEnhanceYourCalm {
						t.Errorf("backend got GOAWAY %v, want ENHANCE_YOUR_CALM", code)
					}
				case <-time.After(5 * time.Second):
					t.Fatal("the flooding backend got no GOAWAY")
				}
				want := codes.Unavailable
				if retry {
					want = codes.OK
				}
				if got := status.Code(err); got != want {
					t.Errorf("call: %v, want %v", err, want)
				}
				// done may run a moment after the retry answered.
				testkit.WaitFor(ctx, t, "the Picker to hear the outcome", func() bool { return len(pick.outcomes()) > 0 })
				outs := pick.outcomes()
				if len(outs) != 1 || status.Code(outs[0]) != codes.Unavailable {
					t.Errorf("the Picker heard %v for the flooding backend, want one UNAVAILABLE", outs)
				}
				if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
					t.Errorf("the other backend: %v", err)
				}
			})
		}
	}
}

// TestGlitchBudgetSparesGoodPeers: grpc-go, as client and as backend,
// returns window after every small message (a WINDOW_UPDATE before each
// BDP PING) and pings for BDP; none of it may count as glitches, or a busy
// connection would be cut. Many calls over one client connection and one
// backend connection, against a small budget, all succeed.
func TestGlitchBudgetSparesGoodPeers(t *testing.T) {
	verifyNoLeaks(t)
	const budget = 20
	_, client := twoBackendProxy(t, "127.0.0.1:1", proxy.Config{MaxGlitches: budget})
	ctx := testkit.Context(t, 60*time.Second)
	for i := range 50 * budget {
		if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	// Messages over the 64 KiB window: grpc-go grants a stream extra
	// window for each (inFlow.maybeAdjust), both ways.
	const msgs, size = 10 * budget, 100 << 10
	params := make([]*testgrpc.ResponseParameters, msgs)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: size}
	}
	out, err := client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: params})
	if err != nil {
		t.Fatal(err)
	}
	got, err := drain(out.Recv)
	if err != nil || len(got) != msgs {
		t.Fatalf("server stream: %d messages, %v; want %d", len(got), err, msgs)
	}
	in, err := client.StreamingInputCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range msgs {
		if err := in.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, size)}}); err != nil {
			t.Fatalf("client stream, message %d: %v", i, err)
		}
	}
	if _, err := in.CloseAndRecv(); err != nil {
		t.Fatalf("client stream: %v", err)
	}
}
