package proxy_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// TestMalformedResponseNotRelayed: a backend's answer that RFC 9113 calls
// malformed (§8.1.1) is not relayed, since an intermediary must not
// forward one: trailers carrying a pseudo-header (§8.1), a response
// without :status or with one that is not three digits (§8.3.2; RFC 9110
// §15). The call fails INTERNAL, as for the other malformed answers. The
// proxy relayed them: grpc-go's client let them pass, but x/net's
// http2.Transport answers pseudo-headers in trailers with a connection
// error, so one hostile backend's answer cut every other call on the
// client's connection, to other backends too.
func TestMalformedResponseNotRelayed(t *testing.T) {
	ok := hpackBlock(":status", "200", "content-type", "application/grpc")
	trailers := hpackBlock("grpc-status", "0")
	for _, tc := range []struct {
		name              string
		headers, trailers []byte // trailers nil: headers is a trailers-only answer
	}{
		{name: "pseudo-header in trailers", headers: ok, trailers: hpackBlock(":status", "200", "grpc-status", "0")},
		{name: "no :status", headers: hpackBlock("content-type", "application/grpc"), trailers: trailers},
		{name: "non-numeric :status", headers: hpackBlock(":status", "2x0", "content-type", "application/grpc"), trailers: trailers},
		{name: "trailers-only without :status", headers: hpackBlock("content-type", "application/grpc", "grpc-status", "0")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			raw := rawBackend(t, h2Frames(func(s *h2Server, f http2.Frame) bool {
				h, isHeaders := f.(*http2.HeadersFrame)
				if !isHeaders {
					return true
				}
				id := h.StreamID
				if tc.trailers == nil {
					return s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: tc.headers, EndHeaders: true, EndStream: true}) == nil
				}
				s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: tc.headers, EndHeaders: true})
				s.fr.WriteData(id, false, grpcMsg(&testgrpc.SimpleResponse{}))
				return s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: tc.trailers, EndHeaders: true, EndStream: true}) == nil
			}))
			// The sibling: a server stream on the good backend, open while
			// the raw backend answers.
			release := make(chan struct{})
			ts, err := testserver.New(testserver.Config{Name: "good", Logger: quietLog,
				StreamingOutputCallF: func(in *testgrpc.StreamingOutputCallRequest, stream testgrpc.TestService_StreamingOutputCallServer) error {
					if err := stream.Send(&testgrpc.StreamingOutputCallResponse{}); err != nil {
						return err
					}
					select {
					case <-release:
					case <-stream.Context().Done():
					}
					return nil
				}})
			if err != nil {
				t.Fatal(err)
			}
			if err := ts.Start("127.0.0.1:0"); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(ts.Stop)
			srv, err := proxy.New(proxy.Config{Picker: &twoPicker{first: raw, second: ts.Addr()}, Logger: quietLog})
			if err != nil {
				t.Fatal(err)
			}
			addr := serveProxy(t, srv).Addr().String()
			tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, addr)
			}}
			t.Cleanup(tr.CloseIdleConnections)
			client := &http.Client{Transport: tr}
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
			defer cancel()
			call := func(method string, body []byte) (*http.Response, error) {
				req, err := http.NewRequestWithContext(ctx, "POST", "http://"+addr+method, bytes.NewReader(body))
				if err != nil {
					t.Fatal(err)
				}
				req.Header.Set("content-type", "application/grpc")
				req.Header.Set("te", "trailers")
				return client.Do(req)
			}

			sib, err := call("/grpc.testing.TestService/StreamingOutputCall", grpcMsg(&testgrpc.StreamingOutputCallRequest{}))
			if err != nil {
				t.Fatalf("sibling: %v", err)
			}
			defer sib.Body.Close()
			if _, err := io.ReadFull(sib.Body, make([]byte, 5)); err != nil {
				t.Fatalf("sibling's first message: %v", err)
			}

			resp, err := call(unaryPath, grpcMsg(&testgrpc.SimpleRequest{}))
			if err != nil {
				t.Fatalf("the call to the raw backend: %v, want an answer with a status", err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if got := resp.Header.Get("grpc-status") + resp.Trailer.Get("grpc-status"); got != "13" {
				t.Errorf("the call to the raw backend: grpc-status %q (HTTP %d), want 13 (INTERNAL)", got, resp.StatusCode)
			}

			close(release)
			if _, err := io.Copy(io.Discard, sib.Body); err != nil {
				t.Fatalf("sibling call on the good backend: %v", err)
			}
			if got := sib.Trailer.Get("grpc-status"); got != "0" {
				t.Errorf("sibling call: grpc-status %q, want 0", got)
			}
		})
	}
}
