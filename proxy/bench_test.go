package proxy_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
)

// The benchmarks run the proxy in a child process (this test binary,
// re-executed with benchChildEnv set) so that its CPU time can be read
// from /proc apart from the client's and the backends'. They report
// proxy-µs/call and proxy-ms/MiB: CPU time (user+system) the proxy
// process spent per call or per MiB relayed; and proxy-allocs/op and
// proxy-B/op: the proxy process's heap allocations per op and their
// bytes (runtime.MemStats Mallocs and TotalAlloc; B/op and allocs/op are
// the benchmark process's, client and backends).
//
//	go test -run '^$' -bench Unary -benchtime 20000x ./proxy/
//	go test -run '^$' -bench Stream -benchtime 300x ./proxy/
//
// STREAMLB_BENCH_CPUPROFILE=file and STREAMLB_BENCH_MEMPROFILE=file make
// the child write a CPU or an allocation profile (of the whole run,
// warm-up included) when it exits.
//
// Compare the paths of one run only: this machine's speed drifts. The
// cross-proxy comparison (HAProxy, nginx) is loadtest/bench/run.sh.
const benchChildEnv = "STREAMLB_BENCH_PROXY"

func TestMain(m *testing.M) {
	if spec := os.Getenv(benchChildEnv); spec != "" {
		os.Exit(runBenchChild(spec))
	}
	os.Exit(m.Run())
}

// runBenchChild serves a proxy for the parent benchmark: spec is
// "engine,backend1,backend2,...". It prints its address and serves until
// stdin closes.
func runBenchChild(spec string) int {
	parts := strings.Split(spec, ",")
	d, err := director.New(director.Config{Logger: quietLog})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var st resolver.State
	for _, a := range parts[1:] {
		st.Addresses = append(st.Addresses, resolver.Address{Addr: a})
	}
	if err := d.UpdateState(st); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var srv server
	switch parts[0] {
	case "frame":
		srv, err = proxy.New(proxy.Config{Picker: d, Logger: quietLog})
	case "frame-hook-noop":
		srv, err = proxy.New(proxy.Config{Picker: d, Logger: quietLog, OnCallEnd: func(proxy.CallInfo) {}})
	case "frame-count-noop":
		srv, err = proxy.New(proxy.Config{Picker: d, Logger: quietLog, CountCallEnd: func(proxy.CallInfo) {}})
	case "frame-hook-log":
		// What an access log costs: a JSON line per call, written nowhere.
		al := slog.New(slog.NewJSONHandler(io.Discard, nil))
		srv, err = proxy.New(proxy.Config{Picker: d, Logger: quietLog, OnCallEnd: func(ci proxy.CallInfo) {
			al.LogAttrs(context.Background(), slog.LevelInfo, "call",
				slog.String("method", ci.Method), slog.String("backend", ci.Backend),
				slog.String("code", ci.Code.String()), slog.Duration("duration", ci.Duration),
				slog.Int64("bytes_in", ci.RequestBytes), slog.Int64("bytes_out", ci.ResponseBytes),
				slog.Int("retries", max(ci.Attempts-1, 0)), slog.String("client", ci.Client.String()))
		}})
	case "frame-retry-on":
		// Every call of the benchmark's service may be retried on
		// UNAVAILABLE: its response headers are held back until its
		// message comes (listHoldLocked).
		srv, err = proxy.New(proxy.Config{Picker: d, Logger: quietLog, RetryOn: []string{"/grpc.testing.TestService/"}})
	case "frame-holdback-off":
		srv, err = proxy.New(proxy.Config{Picker: d, Logger: quietLog, ResponseHoldback: -1})
	case "frame-holdback-64k":
		// Just under BenchmarkStream's messages (64 KiB bodies, a few
		// bytes more encoded): they go on as they arrive.
		srv, err = proxy.New(proxy.Config{Picker: d, Logger: quietLog, ResponseHoldback: 64 << 10})
	case "grpc-proxy":
		srv, err = proxy.NewReference(proxy.ReferenceConfig{Picker: d, Logger: quietLog})
	default:
		err = fmt.Errorf("unknown engine %q", parts[0])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if path := os.Getenv("STREAMLB_BENCH_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err == nil {
			pprof.StartCPUProfile(f)
			defer func() { pprof.StopCPUProfile(); f.Close() }()
		}
	}
	if path := os.Getenv("STREAMLB_BENCH_MEMPROFILE"); path != "" {
		// Every allocation sampled: slower, so profile CPU in another run.
		runtime.MemProfileRate = 1
		defer func() {
			if f, err := os.Create(path); err == nil {
				pprof.Lookup("allocs").WriteTo(f, 0)
				f.Close()
			}
		}()
	}
	fmt.Println(ln.Addr().String())
	go srv.Serve(ln)
	// Each line from the parent asks for the allocations so far; the
	// parent closes stdin to stop us.
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		fmt.Println(ms.Mallocs, ms.TotalAlloc, proxy.ViewsRefused())
	}
	srv.Close()
	return 0
}

// child is a proxy process started by a benchmark.
type child struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout *bufio.Reader
	addr   string
}

// counts returns the child's heap allocations so far, their bytes, and
// the payloads it copied at the bounds on pinned read buffers
// (proxy.ViewsRefused).
func (c *child) counts(b testing.TB) (n, bytes, copies uint64) {
	b.Helper()
	if _, err := io.WriteString(c.stdin, "\n"); err != nil {
		b.Fatal(err)
	}
	line, err := c.stdout.ReadString('\n')
	if err != nil {
		b.Fatal(err)
	}
	if _, err := fmt.Sscan(line, &n, &bytes, &copies); err != nil {
		b.Fatal(err)
	}
	return n, bytes, copies
}

func startChild(b testing.TB, engine string, backends []string) *child {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), benchChildEnv+"="+engine+","+strings.Join(backends, ","))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	c := &child{cmd: cmd, stdin: stdin}
	b.Cleanup(func() {
		stdin.Close()
		cmd.Wait()
	})
	c.stdout = bufio.NewReader(stdout)
	line, err := c.stdout.ReadString('\n')
	if err != nil {
		b.Fatalf("proxy child: %v", err)
	}
	c.addr = strings.TrimSpace(line)
	return c
}

// cpu returns the child's user+system CPU time so far, from
// /proc/PID/stat (fields 14 and 15, in USER_HZ = 100 ticks per second).
func (c *child) cpu(b testing.TB) time.Duration {
	b.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", c.cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	// The command name may hold spaces; fields start after the last ')'.
	fields := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
	utime, err1 := strconv.ParseInt(fields[11], 10, 64)
	stime, err2 := strconv.ParseInt(fields[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		b.Fatal(err)
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// benchTarget sets up three backends and returns the address to load:
// a backend itself for "direct", else a proxy child in front of all three.
func benchTarget(b *testing.B, path string) (addr string, c *child) {
	b.Helper()
	var addrs []string
	for i := range 3 {
		ts, err := testserver.New(testserver.Config{Name: fmt.Sprintf("b%d", i), Logger: quietLog})
		if err != nil {
			b.Fatal(err)
		}
		if err := ts.Start("127.0.0.1:0"); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(ts.Stop)
		addrs = append(addrs, ts.Addr())
	}
	if path == "direct" {
		return addrs[0], nil
	}
	c = startChild(b, path, addrs)
	return c.addr, c
}

// runLoad runs n calls of fn spread over conc goroutines sharing one client
// connection.
func runLoad(b *testing.B, n, conc int, fn func() error) {
	b.Helper()
	var next sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	work := make(chan struct{}, n)
	for range n {
		work <- struct{}{}
	}
	close(work)
	for range conc {
		next.Add(1)
		go func() {
			defer next.Done()
			for range work {
				if err := fn(); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
			}
		}()
	}
	next.Wait()
	if firstErr != nil {
		b.Fatal(firstErr)
	}
}

var benchPaths = []string{"direct", "frame", "grpc-proxy"}

// benchCalls runs, for each path, warmup calls and then b.N measured calls
// of the call that mk builds on a client of one connection to the path,
// at concurrency conc, and reports the proxy's CPU per op, scaled by unit
// and named metric.
func benchCalls(b *testing.B, paths []string, warmup, conc int, bytes int64, unit time.Duration, metric string, mk func(testgrpc.TestServiceClient) func() error) {
	for _, path := range paths {
		b.Run(path, func(b *testing.B) {
			addr, c := benchTarget(b, path)
			cc, err := dialBench(addr)
			if err != nil {
				b.Fatal(err)
			}
			defer cc.Close()
			call := mk(testgrpc.NewTestServiceClient(cc))
			runLoad(b, warmup, conc, call) // warm up connections and pools
			var before time.Duration
			var allocs, allocBytes, copies uint64
			if c != nil {
				allocs, allocBytes, copies = c.counts(b)
				before = c.cpu(b)
			}
			b.SetBytes(bytes)
			b.ResetTimer()
			runLoad(b, b.N, conc, call)
			b.StopTimer()
			if c != nil {
				b.ReportMetric(float64(c.cpu(b)-before)/float64(unit)/float64(b.N), metric)
				n, bytes, cp := c.counts(b)
				b.ReportMetric(float64(n-allocs)/float64(b.N), "proxy-allocs/op")
				b.ReportMetric(float64(bytes-allocBytes)/float64(b.N), "proxy-B/op")
				if metric == "proxy-ms/MiB" {
					// Payloads copied where a view of the read
					// buffer was refused (readref.go): 0 while the
					// bounds on pinned buffers fit the workload.
					b.ReportMetric(float64(cp-copies)/float64(b.N), "proxy-copies/MiB")
				}
			}
		})
	}
}

// BenchmarkUnary measures small unary calls (100-byte request and
// response) at concurrency 50 over one client connection.
func BenchmarkUnary(b *testing.B) {
	req := &testgrpc.SimpleRequest{ResponseSize: 100, Payload: &testgrpc.Payload{Body: make([]byte, 100)}}
	benchCalls(b, benchPaths, 2000, 50, 0, time.Microsecond, "proxy-µs/call", func(client testgrpc.TestServiceClient) func() error {
		return func() error { _, err := client.UnaryCall(context.Background(), req); return err }
	})
}

// BenchmarkUnaryDeadline is BenchmarkUnary through the frame engine with
// a 30s deadline on each call, as loadtest/bench/gen and most clients set
// one: grpc-go then sends a grpc-timeout, in microseconds, that the
// proxy's decoder inserts into its dynamic table (evicting an older
// entry) when it is new. At this benchmark's speed (50 calls in flight,
// a few µs apart) most calls' values are still in the table, sent as an
// index: about 3% of calls carried a new one in an allocation profile of
// x/net's decoder here. At 2,000 calls/s nearly every call does.
//
//	go test -run '^$' -bench 'UnaryDeadline$' -benchtime 20000x ./proxy/
func BenchmarkUnaryDeadline(b *testing.B) {
	req := &testgrpc.SimpleRequest{ResponseSize: 100, Payload: &testgrpc.Payload{Body: make([]byte, 100)}}
	benchCalls(b, []string{"frame"}, 2000, 50, 0, time.Microsecond, "proxy-µs/call", func(client testgrpc.TestServiceClient) func() error {
		return func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_, err := client.UnaryCall(ctx, req)
			return err
		}
	})
}

// BenchmarkUnaryRetryOn is BenchmarkUnary with the called method in
// Config.RetryOn, beside the frame engine without it: the response
// headers of each call are held back until its message tells it is not
// an UNAVAILABLE answer.
//
//	go test -run '^$' -bench UnaryRetryOn -benchtime 20000x ./proxy/
func BenchmarkUnaryRetryOn(b *testing.B) {
	req := &testgrpc.SimpleRequest{ResponseSize: 100, Payload: &testgrpc.Payload{Body: make([]byte, 100)}}
	benchCalls(b, []string{"frame", "frame-retry-on"}, 2000, 50, 0, time.Microsecond, "proxy-µs/call", func(client testgrpc.TestServiceClient) func() error {
		return func() error { _, err := client.UnaryCall(context.Background(), req); return err }
	})
}

// BenchmarkUnaryHook is BenchmarkUnary with Config.OnCallEnd nil, a
// no-op and an access log's JSON line written to io.Discard, and with a
// no-op Config.CountCallEnd:
//
//	go test -run '^$' -bench UnaryHook -benchtime 20000x ./proxy/
func BenchmarkUnaryHook(b *testing.B) {
	req := &testgrpc.SimpleRequest{ResponseSize: 100, Payload: &testgrpc.Payload{Body: make([]byte, 100)}}
	benchCalls(b, []string{"frame", "frame-hook-noop", "frame-count-noop", "frame-hook-log"}, 2000, 50, 0, time.Microsecond, "proxy-µs/call", func(client testgrpc.TestServiceClient) func() error {
		return func() error { _, err := client.UnaryCall(context.Background(), req); return err }
	})
}

// BenchmarkStream measures server streams of 1 MiB (16 messages of
// 64 KiB) at concurrency 4 over one client connection.
func BenchmarkStream(b *testing.B) { benchStream(b, benchPaths) }

// BenchmarkStreamHoldback is BenchmarkStream through the frame engine with
// the response hold-back (holdback.go) off, at 64 KiB (which these
// messages, 64 KiB bodies encoded, are just over: they go on as they
// arrive, the cursor only following them) and at its default, which holds
// every message until its last frame:
//
//	go test -run '^$' -bench StreamHoldback -benchtime 3000x ./proxy/
func BenchmarkStreamHoldback(b *testing.B) {
	benchStream(b, []string{"frame-holdback-off", "frame-holdback-64k", "frame"})
}

func benchStream(b *testing.B, paths []string) {
	params := make([]*testgrpc.ResponseParameters, 16)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: 64 << 10}
	}
	req := &testgrpc.StreamingOutputCallRequest{ResponseParameters: params}
	benchCalls(b, paths, 50, 4, 1<<20, time.Millisecond, "proxy-ms/MiB", func(client testgrpc.TestServiceClient) func() error {
		return func() error {
			st, err := client.StreamingOutputCall(context.Background(), req)
			if err != nil {
				return err
			}
			for {
				if _, err := st.Recv(); err != nil {
					if err == io.EOF {
						return nil
					}
					return err
				}
			}
		}
	})
}

func dialBench(addr string) (*grpc.ClientConn, error) {
	return grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
}
