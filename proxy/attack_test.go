package proxy_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// TestAttackReport runs each attack of the hardening issue, one at a time,
// against a proxy with the default limits in a child process of its own
// (a fresh one per attack, so its peak RSS, VmHWM, is that attack's), with
// a good client calling through it on another connection meanwhile. It
// prints per attack the proxy's peak RSS and CPU seconds, how the
// offending connection ended and the good client's errors, and fails if a
// good call failed; the table marks the attacks whose peak RSS reached
// the goal of 64 MiB. It takes about a minute, so it runs only
// when asked:
//
//	STREAMLB_ATTACKS=1 go test -count=1 -run TestAttackReport -v ./proxy/
//
// With STREAMLB_ATTACK_BIN set to a streamlb binary (the production build:
// CGO_ENABLED=0 go build -tags proxyonly,grpcnotrace,urfave_cli_no_docs),
// the proxy attacked is that binary's `proxy` command with its defaults
// instead of the test binary, which is larger and so holds more of its
// own pages:
//
//	STREAMLB_ATTACKS=1 STREAMLB_ATTACK_BIN=/tmp/streamlb go test -count=1 -run TestAttackReport -v ./proxy/
func TestAttackReport(t *testing.T) {
	if os.Getenv("STREAMLB_ATTACKS") == "" {
		t.Skip("set STREAMLB_ATTACKS=1 to run the attack report (about a minute)")
	}
	var addrs []string
	for i := range 2 {
		ts, err := testserver.New(testserver.Config{Name: fmt.Sprintf("b%d", i), Logger: quietLog})
		if err != nil {
			t.Fatal(err)
		}
		if err := ts.Start("127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ts.Stop)
		addrs = append(addrs, ts.Addr())
	}
	type row struct {
		name, ended     string
		base, peak      int // MiB
		peakAnon        int // MiB, sampled
		cpu             time.Duration
		calls, failures int64
	}
	var rows []row
	for _, a := range attacks {
		t.Run(a.name, func(t *testing.T) {
			c := startAttackChild(t, addrs)
			pid := c.cmd.Process.Pid
			base := procMiB(pid, "VmRSS:")
			cpu0 := c.cpu(t)
			g := startRemoteGood(t, c.addr)
			ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
			anon := sampleAnon(ctx, pid)
			ended := a.run(ctx, c.addr)
			cpu := c.cpu(t) - cpu0
			// The good client goes on a second after the attack: a stall
			// or a failure it left behind counts too.
			pause(ctx, time.Second)
			cancel()
			peak := procMiB(pid, "VmHWM:")
			peakAnon := <-anon
			calls, fails, last := g.stop()
			r := row{name: a.name, ended: ended, base: base, peak: peak, peakAnon: peakAnon, cpu: cpu, calls: calls, failures: fails}
			rows = append(rows, r)
			t.Logf("%s: peak RSS %d MiB (at start %d; RssAnon peak %d MiB, sampled), CPU %.2fs, offender: %s, good client %d/%d failed (last: %v)",
				a.name, peak, base, peakAnon, cpu.Seconds(), ended, fails, calls, last)
			if fails > 0 {
				t.Errorf("good client: %d of %d calls failed, last: %v", fails, calls, last)
			}
			if calls == 0 {
				t.Errorf("good client made no call")
			}
		})
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n| attack | proxy peak RSS | peak RssAnon | proxy CPU | offending connection | good client errors |\n|---|---|---|---|---|---|\n")
	for _, r := range rows {
		over := ""
		if r.peak >= 64 {
			over = " (over the 64 MiB goal)"
		}
		fmt.Fprintf(&b, "| %s | %d MiB%s | %d MiB | %.2f s | %s | %d of %d |\n", r.name, r.peak, over, r.peakAnon, r.cpu.Seconds(), r.ended, r.failures, r.calls)
	}
	t.Log(b.String())
}

// attacks is the list, each bounded in count and time.
var attacks = []struct {
	name string
	run  func(ctx context.Context, addr string) string
}{
	{"rapid reset, 20,000 HEADERS+RST_STREAM", func(ctx context.Context, addr string) string {
		return attackFlood(ctx, addr, 20000, func(a *attacker, i int) error {
			id := uint32(2*i + 1)
			if err := a.headers(id, "/grpc.testing.TestService/EmptyCall", false); err != nil {
				return err
			}
			return a.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		})
	}},
	{"1M empty DATA frames", func(ctx context.Context, addr string) string {
		return attackFlood(ctx, addr, 1<<20, func(a *attacker, i int) error {
			if i == 0 {
				if err := a.headers(1, "/grpc.testing.TestService/FullDuplexCall", false); err != nil {
					return err
				}
			}
			return a.fr.WriteData(1, false, nil)
		})
	}},
	{"replay, 10,000 one-byte DATA frames", func(ctx context.Context, addr string) string {
		return attackFlood(ctx, addr, 10001, func(a *attacker, i int) error {
			if i == 0 {
				// A message prefix promising 1 MiB: the backend waits
				// for the rest, so the attempt keeps its replay.
				if err := a.headers(1, "/grpc.testing.TestService/UnaryCall", false); err != nil {
					return err
				}
				prefix := make([]byte, 5)
				binary.BigEndian.PutUint32(prefix[1:], 1<<20)
				return a.fr.WriteData(1, false, prefix)
			}
			return a.fr.WriteData(1, false, []byte{byte(i)})
		})
	}},
	{"retained headers, 4096 streams of 59 KiB", func(ctx context.Context, addr string) string {
		// One 1000-byte field 58 times: HPACK's dynamic table makes each
		// block a few hundred bytes on the wire, 59 KiB decoded, just
		// under the 60 KiB limit; the backend holds every call (x-hang).
		extra := []string{testserver.MetadataHang, "1"}
		for range 58 {
			extra = append(extra, "x-a", strings.Repeat("v", 1000))
		}
		return attackFlood(ctx, addr, 4096, func(a *attacker, i int) error {
			return a.headers(uint32(2*i+1), "/grpc.testing.TestService/UnaryCall", false, extra...)
		})
	}},
	{"5,000 idle connections", func(ctx context.Context, addr string) string {
		var conns []net.Conn
		defer func() {
			for _, nc := range conns {
				nc.Close()
			}
		}()
		for range 5000 {
			a, err := dialAttacker(addr)
			if err != nil {
				return fmt.Sprintf("dial %d failed: %v", len(conns), err)
			}
			conns = append(conns, a.nc)
		}
		pause(ctx, 3*time.Second)
		// Still open? One byte read with a short deadline tells.
		open := 0
		for _, nc := range conns[:100] {
			nc.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
			if _, err := io.Copy(io.Discard, nc); isTimeout(err) {
				open++
			}
		}
		return fmt.Sprintf("held open, %d of 100 sampled still open after 3 s (idle timeout 5 m)", open)
	}},
	{"16 never-reading clients × 32 streaming calls", func(ctx context.Context, addr string) string {
		var wg sync.WaitGroup
		var cut atomic.Int64
		for range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if neverReadMany(ctx, addr, 32) {
					cut.Add(1)
				}
			}()
		}
		wg.Wait()
		return fmt.Sprintf("%d of 16 closed by the proxy within 35 s (write timeout 20 s)", cut.Load())
	}},
	{"SETTINGS flood", func(ctx context.Context, addr string) string {
		return attackFlood(ctx, addr, 100000, func(a *attacker, i int) error {
			return a.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: uint32(65535 + i%2)})
		})
	}},
	{"PING flood", func(ctx context.Context, addr string) string {
		return attackFlood(ctx, addr, 1000000, func(a *attacker, i int) error {
			return a.fr.WritePing(false, [8]byte{byte(i)})
		})
	}},
	{"CONTINUATION flood", func(ctx context.Context, addr string) string {
		// A header block that never ends: 1,000-byte literal fields,
		// 15 per CONTINUATION frame.
		var frag bytes.Buffer
		enc := hpack.NewEncoder(&frag)
		for range 15 {
			enc.WriteField(hpack.HeaderField{Name: "x-c", Value: strings.Repeat("v", 1000), Sensitive: true})
		}
		return attackFlood(ctx, addr, 100000, func(a *attacker, i int) error {
			if i == 0 {
				return a.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: a.block("/grpc.testing.TestService/EmptyCall")})
			}
			return a.fr.WriteContinuation(1, false, frag.Bytes())
		})
	}},
}

// attacker is a raw HTTP/2 client with its own HPACK encoder.
type attacker struct {
	nc  net.Conn
	fr  *http2.Framer
	hb  bytes.Buffer
	enc *hpack.Encoder
}

func dialAttacker(addr string) (*attacker, error) {
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(nc, http2.ClientPreface); err != nil {
		nc.Close()
		return nil, err
	}
	a := &attacker{nc: nc, fr: http2.NewFramer(nc, nc)}
	a.enc = hpack.NewEncoder(&a.hb)
	if err := a.fr.WriteSettings(); err != nil {
		nc.Close()
		return nil, err
	}
	return a, nil
}

// block encodes the request headers of a gRPC call to path, then extra.
func (a *attacker) block(path string, extra ...string) []byte {
	a.hb.Reset()
	f := append([]string{":method", "POST", ":scheme", "http", ":path", path, ":authority", "x", "content-type", "application/grpc", "te", "trailers"}, extra...)
	for i := 0; i < len(f); i += 2 {
		a.enc.WriteField(hpack.HeaderField{Name: f[i], Value: f[i+1]})
	}
	return a.hb.Bytes()
}

func (a *attacker) headers(id uint32, path string, end bool, extra ...string) error {
	return a.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: a.block(path, extra...), EndHeaders: true, EndStream: end})
}

// attackFlood writes up to n frames with send on a new connection while
// a reader watches it, and describes how the connection ended: the
// proxy's GOAWAY code, or closed without one, or still open when the
// frames were all written and read back 2 s later.
func attackFlood(ctx context.Context, addr string, n int, send func(*attacker, int) error) string {
	a, err := dialAttacker(addr)
	if err != nil {
		return "dial: " + err.Error()
	}
	defer a.nc.Close()
	wrote := make(chan int, 1)
	go func() {
		i := 0
		for ; i < n && ctx.Err() == nil; i++ {
			if send(a, i) != nil {
				break
			}
		}
		wrote <- i
		// Everything written: give the proxy 2 s to end it, then stop
		// the reader.
		t := time.NewTimer(2 * time.Second)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
		}
		a.nc.SetReadDeadline(time.Now())
	}()
	rfr := http2.NewFramer(nil, a.nc)
	goAway := ""
	refused := 0
	var rerr error
	for {
		f, err := rfr.ReadFrame()
		if err != nil {
			rerr = err
			break
		}
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			goAway = f.ErrCode.String()
		case *http2.HeadersFrame:
			if f.StreamEnded() {
				refused++ // a call the proxy answered itself (a status)
			}
		}
	}
	a.nc.Close()
	sent := <-wrote
	var out string
	switch {
	case goAway != "":
		out = "GOAWAY(" + goAway + ")"
	case isTimeout(rerr):
		out = "still open"
	default:
		out = "closed without GOAWAY"
	}
	out += fmt.Sprintf(" after %d of %d frames", sent, n)
	if refused > 0 {
		out += fmt.Sprintf("; %d calls answered with a status", refused)
	}
	return out
}

// neverReadMany opens streams calls that each ask for 8 MiB of answer and
// never reads; it reports whether the proxy closed the connection within
// 35 s (its write timeout is 20 s, counted from the write that blocks,
// which comes once the kernel's buffers are full).
func neverReadMany(ctx context.Context, addr string, streams int) bool {
	a, err := dialAttacker(addr)
	if err != nil {
		return false
	}
	defer a.nc.Close()
	a.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30})
	a.fr.WriteWindowUpdate(0, 1<<30)
	params := make([]*testgrpc.ResponseParameters, 32)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: 256 << 10}
	}
	msg := grpcMsg(&testgrpc.StreamingOutputCallRequest{ResponseParameters: params})
	for i := range streams {
		id := uint32(2*i + 1)
		if a.headers(id, "/grpc.testing.TestService/StreamingOutputCall", false) != nil || a.fr.WriteData(id, true, msg) != nil {
			return false
		}
	}
	pause(ctx, 20*time.Second)
	// Reading would make this a reading client: a PING a second tells
	// instead, its write failing once the proxy closed the connection.
	a.nc.SetWriteDeadline(time.Now().Add(time.Minute))
	for i := range 15 {
		if a.fr.WritePing(false, [8]byte{byte(i)}) != nil {
			return true
		}
		pause(ctx, time.Second)
	}
	return false
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// remoteGood is the good client of an attack: unary calls one after the
// other on its own connection to the proxy.
type remoteGood struct {
	calls, errs atomic.Int64
	last        atomic.Value
	cancel      context.CancelFunc
	done        chan struct{}
}

func startRemoteGood(t *testing.T, addr string) *remoteGood {
	t.Helper()
	cc, err := dialBench(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	client := testgrpc.NewTestServiceClient(cc)
	ctx, cancel := context.WithCancel(context.Background())
	g := &remoteGood{cancel: cancel, done: make(chan struct{})}
	if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatalf("good client before the attack: %v", err)
	}
	go func() {
		defer close(g.done)
		// 500 calls a second at most, so the proxy's CPU is mostly the
		// attack's.
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for ctx.Err() == nil {
			select {
			case <-tick.C:
			case <-ctx.Done():
				return
			}
			cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{ResponseSize: 100})
			ccancel()
			if ctx.Err() != nil {
				return // stopped mid-call: not the proxy's doing
			}
			g.calls.Add(1)
			if err != nil {
				g.errs.Add(1)
				g.last.Store(err)
			}
		}
	}()
	return g
}

func (g *remoteGood) stop() (calls, errs int64, last any) {
	g.cancel()
	<-g.done
	return g.calls.Load(), g.errs.Load(), g.last.Load()
}

// sampleAnon samples the RssAnon of process pid every 20 ms until ctx
// ends, and then sends the largest value seen, in MiB. VmHWM includes the
// pages of the binary the proxy ran (file-backed, about half of its RSS at
// start); the anonymous memory is what the attack made it hold.
func sampleAnon(ctx context.Context, pid int) <-chan int {
	out := make(chan int, 1)
	go func() {
		peak := procMiB(pid, "RssAnon:")
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				out <- max(peak, procMiB(pid, "RssAnon:"))
				return
			case <-tick.C:
				peak = max(peak, procMiB(pid, "RssAnon:"))
			}
		}
	}()
	return out
}

// procMiB reads a "kB" line of /proc/PID/status, in MiB.
func procMiB(pid int, key string) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, key); ok {
			kb, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return kb >> 10
		}
	}
	return 0
}

// startAttackChild starts the proxy an attack runs against: the test
// binary in a child process (startChild), or the streamlb binary named by
// STREAMLB_ATTACK_BIN running `streamlb proxy` with its default limits.
func startAttackChild(t *testing.T, backends []string) *child {
	t.Helper()
	bin := os.Getenv("STREAMLB_ATTACK_BIN")
	if bin == "" {
		return startChild(t, "frame", backends)
	}
	// A port for it: free now, and the child takes it at once.
	addr := testkit.DeadAddr(t)
	args := []string{"proxy", "--listen", addr, "--log-level", "error"}
	for _, b := range backends {
		args = append(args, "--backend", b)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		nc, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			nc.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s proxy is not listening on %s: %v", bin, addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return &child{cmd: cmd, addr: addr}
}
