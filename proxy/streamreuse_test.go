package proxy_test

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// The proxy reuses a call's stream (its largest allocation) for a later
// call once nothing refers to it any more (proxy/stream.go). An owner the
// reference count missed would make one call's frames, headers or window
// credits land on another call in the same memory. TestStreamReuseNoCrossTalk
// makes many concurrent calls, each with a payload and metadata derived
// from its own id, through backends that echo them, while calls are
// retried (UNAVAILABLE answers, GOAWAYs, refused and silent backends),
// cancelled, cut by deadlines and route timeouts, and backends are killed
// mid-call: every answer, header and trailer a call gets must be its own.

// reuseIDKey is the request header carrying the call's id; the backends
// echo it in the response headers and trailers.
const reuseIDKey = "x-reuse-call"

// reuseDelayKey asks a backend to wait that many milliseconds before it
// answers (deadlines and route timeouts cut such calls).
const reuseDelayKey = "x-reuse-delay-ms"

// reuseRouteKey asks the test's picker for a route timeout of that many
// milliseconds (handed to it through Config.PickMetadata).
const reuseRouteKey = "x-reuse-route-ms"

// reuseUnavailableKey asks backends named in its value to answer
// UNAVAILABLE, trailers-only, so that the proxy retries elsewhere.
const reuseUnavailableKey = "x-reuse-unavailable"

// reuseBody is the content of message i of call id, n bytes: the id and
// index lead, so that a message of another call never matches.
func reuseBody(id uint64, i, n int) []byte {
	out := make([]byte, n)
	r := rand.New(rand.NewPCG(id, uint64(i)))
	for j := 0; j < n; j += 8 {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], r.Uint64())
		copy(out[j:], w[:])
	}
	var head [12]byte
	binary.LittleEndian.PutUint64(head[:], id)
	binary.LittleEndian.PutUint32(head[8:], uint32(i))
	copy(out, head[:])
	return out
}

// reuseIDOf reads the call id a backend was sent.
func reuseIDOf(ctx context.Context) (string, metadata.MD) {
	md, _ := metadata.FromIncomingContext(ctx)
	return lastMD(md, reuseIDKey), md
}

// reuseWait sleeps for the delay the request asks, or until ctx ends.
func reuseWait(ctx context.Context, md metadata.MD) error {
	ms, _ := strconv.Atoi(lastMD(md, reuseDelayKey))
	if ms <= 0 {
		return nil
	}
	select {
	case <-time.After(time.Duration(ms) * time.Millisecond):
		return nil
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	}
}

// reuseRefuse reports whether backend name must answer UNAVAILABLE.
func reuseRefuse(name string, md metadata.MD) bool {
	for _, v := range md.Get(reuseUnavailableKey) {
		for _, n := range strings.Split(v, ",") {
			if n == name {
				return true
			}
		}
	}
	return false
}

// reuseBackendConfig is an echo backend: headers and trailers carry the
// call's id back (with the backend's name, in another field); unary and
// bidi echo each body; server streaming answers reuseBody(id, i, size);
// client streaming sums what it received into a trailer.
func reuseBackendConfig(name string) testserver.Config {
	// Most calls' header blocks fit the stream's inline field storage
	// (eight fields for the headers and trailers together), where a
	// reused stream would overwrite them; every third call's spill.
	meta := func(id string) metadata.MD {
		if n, _ := strconv.ParseUint(id, 10, 64); n%3 == 0 {
			return metadata.Pairs(reuseIDKey, id, "x-reuse-backend", name, "x-reuse-pad", strings.Repeat(id, 8))
		}
		return metadata.Pairs(reuseIDKey, id)
	}
	return testserver.Config{
		Name:   name,
		Logger: quietLog,
		UnaryCallF: func(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
			id, md := reuseIDOf(ctx)
			if reuseRefuse(name, md) {
				return nil, status.Error(codes.Unavailable, "refused for the test")
			}
			if err := reuseWait(ctx, md); err != nil {
				return nil, err
			}
			grpc.SetHeader(ctx, meta(id))
			grpc.SetTrailer(ctx, meta(id))
			return &testgrpc.SimpleResponse{Payload: &testgrpc.Payload{Body: in.GetPayload().GetBody()}}, nil
		},
		StreamingOutputCallF: func(in *testgrpc.StreamingOutputCallRequest, st testgrpc.TestService_StreamingOutputCallServer) error {
			id, md := reuseIDOf(st.Context())
			if reuseRefuse(name, md) {
				return status.Error(codes.Unavailable, "refused for the test")
			}
			n, _ := strconv.ParseUint(id, 10, 64)
			st.SetHeader(meta(id))
			st.SetTrailer(meta(id))
			for i, p := range in.GetResponseParameters() {
				if err := reuseWait(st.Context(), md); err != nil {
					return err
				}
				if err := st.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: reuseBody(n, i, int(p.GetSize()))}}); err != nil {
					return err
				}
			}
			return nil
		},
		StreamingInputCallF: func(st testgrpc.TestService_StreamingInputCallServer) error {
			id, md := reuseIDOf(st.Context())
			if reuseRefuse(name, md) {
				return status.Error(codes.Unavailable, "refused for the test")
			}
			h := sha256.New()
			for {
				in, err := st.Recv()
				if errors.Is(err, io.EOF) {
					if err := reuseWait(st.Context(), md); err != nil {
						return err
					}
					st.SetHeader(meta(id))
					trl := meta(id)
					trl.Set("x-sum", hex.EncodeToString(h.Sum(nil)[:8]))
					st.SetTrailer(trl)
					return st.SendAndClose(&testgrpc.StreamingInputCallResponse{})
				}
				if err != nil {
					return err
				}
				atk5HashBody(h, in.GetPayload().GetBody())
			}
		},
		FullDuplexCallF: func(st testgrpc.TestService_FullDuplexCallServer) error {
			id, md := reuseIDOf(st.Context())
			if reuseRefuse(name, md) {
				return status.Error(codes.Unavailable, "refused for the test")
			}
			st.SetHeader(meta(id))
			st.SetTrailer(meta(id))
			for {
				in, err := st.Recv()
				if errors.Is(err, io.EOF) {
					return nil
				}
				if err != nil {
					return err
				}
				if err := reuseWait(st.Context(), md); err != nil {
					return err
				}
				if err := st.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: in.GetPayload().GetBody()}}); err != nil {
					return err
				}
			}
		},
	}
}

// reusePicker picks round robin among its addresses, avoiding those a
// call tried, and gives a call the route timeout its reuseRouteKey header
// asks for.
type reusePicker struct {
	addrs []string
	next  atomic.Uint64
}

func (p *reusePicker) Pick(context.Context, string) (string, func(error), error) {
	panic("the proxy calls PickUpstream")
}

func (p *reusePicker) PickUpstream(ctx context.Context, _ string, _ *proxy.Upstream, avoid []string) (proxy.UpstreamPick, error) {
	var pk proxy.UpstreamPick
	md, _ := metadata.FromIncomingContext(ctx)
	if ms, _ := strconv.Atoi(lastMD(md, reuseRouteKey)); ms > 0 {
		pk.Timeout = time.Duration(ms) * time.Millisecond
	}
	n := p.next.Add(1)
	for i := range p.addrs {
		a := p.addrs[(int(n)+i)%len(p.addrs)]
		if !contains(avoid, a) {
			pk.Addr = a
			return pk, nil
		}
	}
	pk.Addr = p.addrs[int(n)%len(p.addrs)]
	return pk, nil
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// reuseCall is what one call was, and what it got.
type reuseCall struct {
	id               uint64
	kind             string
	err              error
	deadline, cancel bool // it had a deadline (its own or a route's), a cancel
	refused          bool // a backend was asked to answer UNAVAILABLE
	wrong            string
}

// checkMD notes on c a header or trailer that names another call. Absent
// is fine: a status of the proxy's own carries none.
func (c *reuseCall) checkMD(what string, md metadata.MD) {
	if c.wrong != "" {
		return
	}
	want := strconv.FormatUint(c.id, 10)
	for _, v := range md.Get(reuseIDKey) {
		if v != want {
			c.wrong = fmt.Sprintf("%s %s is %q, want %q", what, reuseIDKey, v, want)
			return
		}
	}
	for _, v := range md.Get("x-reuse-pad") {
		if v != strings.Repeat(want, 8) {
			c.wrong = fmt.Sprintf("%s x-reuse-pad is %q, want call %q's", what, v, want)
			return
		}
	}
}

// reuseSizes are the message sizes calls use: small ones (a stream's
// inline storage), frame boundaries, and a few over the hold-back.
var reuseSizes = []int{0, 1, 12, 100, 1000, 4096, 16384, 16385, 40000}

// doReuseCall makes call id, of a random kind, through client.
func doReuseCall(ctx context.Context, client testgrpc.TestServiceClient, id uint64, r *rand.Rand, backendNames []string) reuseCall {
	c := reuseCall{id: id}
	sid := strconv.FormatUint(id, 10)
	md := metadata.Pairs(reuseIDKey, sid)
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	switch r.IntN(8) {
	case 0:
		c.deadline = true
		var c2 context.CancelFunc
		cctx, c2 = context.WithTimeout(cctx, time.Duration(5+r.IntN(80))*time.Millisecond)
		defer c2()
		md.Set(reuseDelayKey, strconv.Itoa(r.IntN(60)))
	case 1:
		c.deadline = true
		md.Set(reuseRouteKey, strconv.Itoa(5+r.IntN(80)))
		md.Set(reuseDelayKey, strconv.Itoa(r.IntN(60)))
	case 2:
		c.cancel = true
		time.AfterFunc(time.Duration(r.IntN(40))*time.Millisecond, cancel)
		md.Set(reuseDelayKey, strconv.Itoa(r.IntN(30)))
	}
	if r.IntN(4) == 0 {
		// One or two backends answer UNAVAILABLE: retried elsewhere
		// (RetryOn), or relayed once the retries or the budget ran out.
		c.refused = true
		md.Append(reuseUnavailableKey, backendNames[r.IntN(len(backendNames))]+","+backendNames[r.IntN(len(backendNames))])
	}
	cctx = metadata.NewOutgoingContext(cctx, md)
	size := func() int { return reuseSizes[r.IntN(len(reuseSizes))] }
	var hdr, trl metadata.MD
	switch r.IntN(4) {
	case 0:
		c.kind = "unary"
		b := reuseBody(id, 0, size())
		resp, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: b}}, grpc.Header(&hdr), grpc.Trailer(&trl))
		c.checkMD("header", hdr)
		c.checkMD("trailer", trl)
		if err != nil {
			c.err = err
			break
		}
		if got := resp.GetPayload().GetBody(); string(got) != string(b) && c.wrong == "" {
			c.wrong = fmt.Sprintf("unary response of %d bytes (leading %x), want %d (leading %x)", len(got), head(got), len(b), head(b))
		}
		if lastMD(hdr, reuseIDKey) != sid && c.wrong == "" {
			c.wrong = fmt.Sprintf("unary OK without its id in the headers: %v", hdr)
		}
	case 1:
		c.kind = "server-stream"
		ps := make([]*testgrpc.ResponseParameters, 1+r.IntN(6))
		for i := range ps {
			ps[i] = &testgrpc.ResponseParameters{Size: int32(size())}
		}
		st, err := client.StreamingOutputCall(cctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: ps})
		if err != nil {
			c.err = err
			break
		}
		for i := 0; ; i++ {
			m, err := st.Recv()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					c.err = err
				} else if i != len(ps) && c.wrong == "" {
					c.wrong = fmt.Sprintf("server stream: %d messages, want %d", i, len(ps))
				}
				break
			}
			if i >= len(ps) {
				c.wrong = "server stream: a message more than asked for"
				break
			}
			if got, want := m.GetPayload().GetBody(), reuseBody(id, i, int(ps[i].GetSize())); string(got) != string(want) {
				c.wrong = fmt.Sprintf("server stream message %d: %d bytes (leading %x), want %d (leading %x)", i, len(got), head(got), len(want), head(want))
				break
			}
		}
		h, _ := st.Header()
		c.checkMD("header", h)
		c.checkMD("trailer", st.Trailer())
	case 2:
		c.kind = "client-stream"
		st, err := client.StreamingInputCall(cctx)
		if err != nil {
			c.err = err
			break
		}
		h := sha256.New()
		for i := 0; i < 1+r.IntN(5); i++ {
			b := reuseBody(id, i, size())
			atk5HashBody(h, b)
			if st.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: b}}) != nil {
				break // the status comes from CloseAndRecv
			}
		}
		_, err = st.CloseAndRecv()
		hd, _ := st.Header()
		c.checkMD("header", hd)
		c.checkMD("trailer", st.Trailer())
		if err != nil {
			c.err = err
			break
		}
		if got, want := lastMD(st.Trailer(), "x-sum"), hex.EncodeToString(h.Sum(nil)[:8]); got != want && c.wrong == "" {
			c.wrong = fmt.Sprintf("client stream: the backend summed %s, want %s", got, want)
		}
	case 3:
		c.kind = "bidi"
		st, err := client.FullDuplexCall(cctx)
		if err != nil {
			c.err = err
			break
		}
		n := 1 + r.IntN(5)
		for i := 0; i < n; i++ {
			b := reuseBody(id, i, size())
			if err := st.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: b}}); err != nil {
				_, c.err = st.Recv()
				break
			}
			m, err := st.Recv()
			if err != nil {
				c.err = err
				break
			}
			if got := m.GetPayload().GetBody(); string(got) != string(b) {
				c.wrong = fmt.Sprintf("bidi answer %d: %d bytes (leading %x), want %d (leading %x)", i, len(got), head(got), len(b), head(b))
				break
			}
		}
		if c.err == nil && c.wrong == "" {
			st.CloseSend()
			if _, err := st.Recv(); !errors.Is(err, io.EOF) {
				if err == nil {
					c.wrong = "bidi: a message after the half-close"
				} else {
					c.err = err
				}
			}
		}
		hd, _ := st.Header()
		c.checkMD("header", hd)
		c.checkMD("trailer", st.Trailer())
	}
	if c.err != nil && errors.Is(c.err, io.EOF) {
		c.err = nil
	}
	return c
}

func head(b []byte) []byte { return b[:min(len(b), 12)] }

// allowed reports whether c's error is one its circumstances explain:
// its deadline, its cancel, UNAVAILABLE for refusals and killed backends.
// Not INTERNAL: every message fits the hold-back, so a kill never cuts
// one the client started to read.
func (c *reuseCall) allowed() bool {
	if c.err == nil {
		return true
	}
	switch status.Code(c.err) {
	case codes.DeadlineExceeded:
		return c.deadline
	case codes.Canceled:
		return c.cancel || c.deadline
	case codes.Unavailable:
		return true // refusals, kills, restarts
	}
	return false
}

// TestStreamReuseNoCrossTalk: every answer, header and trailer a call gets
// is its own, under retries, cancels, deadlines, route timeouts and
// backends killed and restarted. $STREAMLB_REUSE (a duration) runs it
// longer than its default few seconds.
func TestStreamReuseNoCrossTalk(t *testing.T) {
	dur := 4 * time.Second
	if v := os.Getenv("STREAMLB_REUSE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("STREAMLB_REUSE=%q: %v", v, err)
		}
		dur = d
	} else if testing.Short() {
		dur = time.Second
	}
	ctx := testkit.Context(t, dur+90*time.Second)

	const nBackends = 3
	names := make([]string, nBackends)
	backends := make([]*testserver.Server, nBackends)
	addrs := make([]string, 0, nBackends+1)
	for i := range backends {
		names[i] = fmt.Sprintf("r%d", i)
		backends[i] = startTestserver(t, reuseBackendConfig(names[i]))
		addrs = append(addrs, backends[i].Addr())
	}
	// A backend that accepts connections and never speaks HTTP/2: calls
	// picked for it wait out their handshake wait and go elsewhere
	// (the handshake timer, then the pending list swept by failAll).
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var silentConns sync.WaitGroup
	go func() {
		for {
			nc, err := silent.Accept()
			if err != nil {
				return
			}
			silentConns.Add(1)
			go func() {
				defer silentConns.Done()
				io.Copy(io.Discard, nc)
				nc.Close()
			}()
		}
	}()
	t.Cleanup(func() { silent.Close(); silentConns.Wait() })
	addrs = append(addrs, silent.Addr().String())

	pk := &reusePicker{addrs: addrs}
	srv, err := proxy.New(proxy.Config{
		Picker:           pk,
		Logger:           quietLog,
		RetryOn:          []string{"/grpc.testing.TestService/"},
		MaxRetries:       3,
		PickMetadata:     []string{reuseRouteKey},
		HandshakeTimeout: 300 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		<-served
	})

	const conns, workers = 4, 24
	clients := make([]testgrpc.TestServiceClient, conns)
	for i := range clients {
		cc, err := grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		clients[i] = testgrpc.NewTestServiceClient(cc)
	}

	loadCtx, stop := context.WithTimeout(ctx, dur)
	defer stop()
	var (
		nextID  atomic.Uint64
		mu      sync.Mutex
		results []reuseCall
		wg      sync.WaitGroup
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			var mine []reuseCall
			for loadCtx.Err() == nil {
				// The call outlives the load's end: calls in flight then
				// finish rather than fail.
				callCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 20*time.Second)
				mine = append(mine, doReuseCall(callCtx, clients[w%conns], nextID.Add(1), r, names))
				cancel()
			}
			mu.Lock()
			results = append(results, mine...)
			mu.Unlock()
		}()
	}

	// Kill or restart (GOAWAY) a backend now and then, mid-call; the
	// backend comes back on the same address.
	var restarts, kills int
	churn := time.NewTicker(400 * time.Millisecond)
	for i := 0; loadCtx.Err() == nil; i++ {
		select {
		case <-loadCtx.Done():
			continue
		case <-churn.C:
		}
		idx := i % nBackends
		old := backends[idx]
		addr := old.Addr()
		if i%2 == 0 {
			old.Stop()
			kills++
		} else {
			sctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			if err := old.Shutdown(sctx); err != nil {
				t.Errorf("graceful stop of %s: %v", old.Name(), err)
			}
			cancel()
			restarts++
		}
		time.Sleep(50 * time.Millisecond) // refused connections meanwhile
		ts, err := testserver.New(reuseBackendConfig(names[idx]))
		if err != nil {
			t.Fatal(err)
		}
		if err := ts.Start(addr); err != nil {
			t.Fatalf("restart on %s: %v", addr, err)
		}
		t.Cleanup(ts.Stop)
		backends[idx] = ts
	}
	churn.Stop()
	wg.Wait()

	counts := map[string]int{}
	bad := 0
	for i := range results {
		c := &results[i]
		if c.wrong != "" {
			bad++
			if bad <= 20 {
				t.Errorf("call %d (%s): CROSS-TALK: %s (err %v)", c.id, c.kind, c.wrong, c.err)
			}
			continue
		}
		counts[status.Code(c.err).String()]++
		if !c.allowed() {
			bad++
			if bad <= 20 {
				t.Errorf("call %d (%s, deadline %v, cancel %v, refused %v): unexpected %v", c.id, c.kind, c.deadline, c.cancel, c.refused, c.err)
			}
		}
	}
	t.Logf("%d calls, %d kills, %d graceful restarts: %v", len(results), kills, restarts, counts)
	if n := proxy.UnsettledStreams(); n > 0 {
		t.Errorf("%d streams lost their last reference while still in use", n)
	}
	if counts["OK"] < len(results)/4 {
		t.Errorf("only %d of %d calls succeeded", counts["OK"], len(results))
	}
}
