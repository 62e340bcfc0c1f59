package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// rawClient is a plain HTTP/2 client (h2c) for requests a gRPC client
// would never send.
func rawClient(t *testing.T) *http.Client {
	t.Helper()
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &protos}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// emptyGRPCMessage is one length-prefixed gRPC message of zero bytes.
var emptyGRPCMessage = []byte{0, 0, 0, 0, 0}

func grpcRequest(ctx context.Context, t *testing.T, addr, path string, hdr map[string]string) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+path, bytes.NewReader(emptyGRPCMessage))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("content-type", "application/grpc")
	req.Header.Set("te", "trailers")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	return req
}

// grpcStatusOf reads the status of a raw response: from trailers, or from
// the headers of a trailers-only response.
func grpcStatusOf(t *testing.T, resp *http.Response) (string, string) {
	t.Helper()
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if s := resp.Header.Get("grpc-status"); s != "" {
		return s, resp.Header.Get("grpc-message")
	}
	return resp.Trailer.Get("grpc-status"), resp.Trailer.Get("grpc-message")
}

// TestDeadlineInProxy sends grpc-timeout from a client that does not
// enforce it itself, so only the proxy can end the call.
func TestDeadlineInProxy(t *testing.T) {
	verifyNoLeaks(t)
	cancelled := make(chan string, 1)
	e := newEnv(t, envOpts{backends: 1, tscfg: func(_ int, c *testserver.Config) {
		c.OnCancel = func(m string) { cancelled <- m }
	}})
	ctx := testkit.Context(t, 20*time.Second)
	req := grpcRequest(ctx, t, e.addr, "/grpc.testing.TestService/EmptyCall", map[string]string{"grpc-timeout": "1S", testserver.MetadataHang: "1"})
	resp, err := rawClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	code, msg := grpcStatusOf(t, resp)
	if code != "4" || !strings.Contains(msg, "deadline") {
		t.Errorf("got grpc-status %q message %q, want 4 (DEADLINE_EXCEEDED) from the proxy", code, msg)
	}
	select {
	case <-cancelled:
	case <-ctx.Done():
		t.Fatal("backend stream was not cancelled after the deadline")
	}
}

func TestNoBackend(t *testing.T) {
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{engine: engine, backends: 1})
			ctx := testkit.Context(t, 20*time.Second)

			e.setBackends() // the set is empty
			_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{})
			if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "no backend") {
				t.Errorf("empty set: got %v, want UNAVAILABLE naming the cause", err)
			}

			e.setBackends(testkit.DeadAddr(t)) // nothing listens there
			_, err = e.client.EmptyCall(ctx, &testgrpc.Empty{})
			if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "refused") {
				t.Errorf("refusing backend: got %v, want UNAVAILABLE saying connection refused", err)
			}
		})
	}
}

// TestBackendKilledMidStream stops a backend while a stream runs on it: the
// client gets UNAVAILABLE, and later calls land on the other backends.
func TestBackendKilledMidStream(t *testing.T) {
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{engine: engine})
			ctx := testkit.Context(t, 30*time.Second)
			st, err := e.client.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{
				ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}, {Size: 10, IntervalUs: 20e6}},
			})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := st.Recv(); err != nil {
				t.Fatal(err)
			}
			hdr, err := st.Header()
			if err != nil {
				t.Fatal(err)
			}
			victim := e.backendByName(testserver.BackendFromHeader(hdr))
			victim.Stop()
			if _, err := st.Recv(); status.Code(err) != codes.Unavailable {
				t.Fatalf("stream on a killed backend ended with %v, want UNAVAILABLE", err)
			}
			// Calls to the dead backend fail until the director ejects it;
			// after that every call lands elsewhere.
			var failed, lastFailed int
			for i := range 60 {
				var h metadata.MD
				_, err := e.client.EmptyCall(ctx, &testgrpc.Empty{}, grpc.Header(&h))
				if err != nil {
					if status.Code(err) != codes.Unavailable {
						t.Fatalf("call %d: %v, want success or UNAVAILABLE", i, err)
					}
					failed++
					lastFailed = i
					continue
				}
				if testserver.BackendFromHeader(h) == victim.Name() {
					t.Fatalf("call %d served by the stopped backend", i)
				}
			}
			if lastFailed > 30 {
				t.Errorf("call %d still failed; the dead backend kept getting calls (%d failures)", lastFailed, failed)
			}
			t.Logf("%d of 60 calls failed before the dead backend was ejected", failed)
		})
	}
}

func TestNonGRPCInput(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	ctx := testkit.Context(t, 20*time.Second)

	t.Run("HTTP/1.1", func(t *testing.T) {
		resp, err := http.Get("http://" + e.addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusHTTPVersionNotSupported || !strings.Contains(string(body), "HTTP/2") {
			t.Errorf("got %d %q, want 505 explaining HTTP/2 is required", resp.StatusCode, body)
		}
	})
	t.Run("bad preface", func(t *testing.T) {
		nc, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		// More than the preface's 24 bytes, so some is unread when the
		// proxy decides: its close must still be clean.
		io.WriteString(nc, "PRX this is not HTTP/2 at all...."+strings.Repeat(".", 4096))
		fr := http2.NewFramer(nil, bufio.NewReader(nc))
		// RFC 9113 §3.4: SETTINGS is the first frame of a server's
		// preface, then the connection error's GOAWAY.
		var kinds []string
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				// A clean close: FIN, not a TCP reset.
				if err != io.EOF {
					t.Errorf("after %v: got %v, want EOF", kinds, err)
				}
				break
			}
			kinds = append(kinds, f.Header().Type.String())
			if ga, ok := f.(*http2.GoAwayFrame); ok && (ga.ErrCode != http2.ErrCodeProtocol || ga.LastStreamID != 0) {
				t.Errorf("got GOAWAY %v last %d, want PROTOCOL_ERROR last 0", ga.ErrCode, ga.LastStreamID)
			}
		}
		if strings.Join(kinds, " ") != "SETTINGS GOAWAY" {
			t.Errorf("frames: %v, want SETTINGS GOAWAY", kinds)
		}
	})
	httpCases := []struct {
		name       string
		method     string
		ct         string
		wantStatus int
		wantCode   string
	}{
		{name: "wrong content-type", method: http.MethodPost, ct: "application/json", wantStatus: 415, wantCode: "3"},
		{name: "GET", method: http.MethodGet, ct: "application/grpc", wantStatus: 405, wantCode: "13"},
	}
	for _, tc := range httpCases {
		t.Run(tc.name, func(t *testing.T) {
			req := grpcRequest(ctx, t, e.addr, "/grpc.testing.TestService/EmptyCall", map[string]string{"content-type": tc.ct})
			req.Method = tc.method
			if tc.method == http.MethodGet {
				req.Body = nil
				req.ContentLength = 0
			}
			resp, err := rawClient(t).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			code, msg := grpcStatusOf(t, resp)
			if resp.StatusCode != tc.wantStatus || code != tc.wantCode || msg == "" {
				t.Errorf("got HTTP %d grpc-status %q %q, want HTTP %d grpc-status %s with a message", resp.StatusCode, code, msg, tc.wantStatus, tc.wantCode)
			}
		})
	}
	if n := e.backends[0].Calls(); n != 0 {
		t.Errorf("backend saw %d calls from non-gRPC input", n)
	}
}

// TestGracefulShutdown checks Shutdown lets a call in flight finish and
// refuses new connections.
func TestGracefulShutdown(t *testing.T) {
	for _, engine := range engines {
		t.Run(engine, func(t *testing.T) {
			verifyNoLeaks(t)
			e := newEnv(t, envOpts{engine: engine, backends: 1})
			ctx := testkit.Context(t, 20*time.Second)
			res := make(chan error, 1)
			go func() {
				_, err := e.client.EmptyCall(metadata.AppendToOutgoingContext(ctx, testserver.MetadataDelay, "300ms"), &testgrpc.Empty{})
				res <- err
			}()
			testkit.WaitFor(ctx, t, "the call to reach the backend", func() bool { return e.backends[0].InFlight() == 1 })
			if err := e.srv.Shutdown(ctx); err != nil {
				t.Fatalf("Shutdown: %v", err)
			}
			if err := <-res; err != nil {
				t.Errorf("in-flight call failed during graceful shutdown: %v", err)
			}
			if nc, err := net.DialTimeout("tcp", e.addr, time.Second); err == nil {
				nc.Close()
				t.Error("listener still accepts after Shutdown")
			}
		})
	}
}

// TestShutdownDeadline checks an expired drain cuts the remaining calls
// with a status that says why, and still returns. The connection was
// closed under them: the client saw "error reading from server: EOF"
// (attack round 3).
func TestShutdownDeadline(t *testing.T) {
	verifyNoLeaks(t)
	e := newEnv(t, envOpts{backends: 1})
	ctx := testkit.Context(t, 20*time.Second)
	res := make(chan error, 1)
	go func() {
		_, err := e.client.EmptyCall(metadata.AppendToOutgoingContext(ctx, testserver.MetadataHang, "1"), &testgrpc.Empty{})
		res <- err
	}()
	testkit.WaitFor(ctx, t, "the call to reach the backend", func() bool { return e.backends[0].InFlight() == 1 })
	sctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := e.srv.Shutdown(sctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown returned %v, want context.DeadlineExceeded", err)
	}
	if err := <-res; status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "streamlb: server is shutting down") {
		t.Errorf("call cut by shutdown: %v, want UNAVAILABLE from streamlb saying it is shutting down", err)
	}
	testkit.WaitFor(ctx, t, "the backend to see the call cancelled", func() bool { return e.backends[0].Canceled() == 1 })
}

var _ = proxy.ErrServerClosed
