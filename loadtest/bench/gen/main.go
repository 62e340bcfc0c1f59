// Command gen is the load generator of loadtest/bench/run.sh: a plain
// grpc-go client with the generated TestService stub, so that on a 2-CPU
// machine the client costs as little CPU as a gRPC client can and the proxy
// under test, not the generator, sets the pace. `streamlb loadtest` (ghz
// inside) is the general tool; its per-call cost (JSON to dynamic protobuf
// for every request, a tap parsing every HTTP/2 frame for the x-backend
// header, its reports) is what made the harness top out near 3.7k calls/s
// (issue 12).
//
// It makes UnaryCall calls (100-byte payloads by default) or
// StreamingOutputCall calls (-stream: 16 x 64 KiB responses), over ONE
// connection to -target, or with -targets a,b,c over one connection per
// backend with grpc-go's own round_robin: the client-side balancing
// baseline. Each call's backend comes from the backend itself: server_id
// in a unary response, the x-backend header of a stream, both set by
// `streamlb testserver`.
//
// Output is one JSON object on stdout, with the fields run.sh reads:
// count, errors, rps, latency.p50_ms/p99_ms, backends[].name/count/share,
// error_messages.
//
//	go run ./loadtest/bench/gen -target 127.0.0.1:8080 -c 50 -n 20000
//	go run ./loadtest/bench/gen -targets 127.0.0.1:9001,127.0.0.1:9002,127.0.0.1:9003 -c 50 -n 20000
//	go run ./loadtest/bench/gen -target 127.0.0.1:8080 -c 50 -rate 2000 -duration 5s
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"
)

type options struct {
	target, targets string
	conc, total     int
	rate            int
	duration        time.Duration
	timeout         time.Duration
	size            int
	stream          bool
	caCert          string
	serverName      string
}

type backendRow struct {
	Name  string  `json:"name"`
	Count int     `json:"count"`
	Share float64 `json:"share"`
}

type report struct {
	Count   int     `json:"count"`
	Errors  int     `json:"errors"`
	RPS     float64 `json:"rps"`
	Seconds float64 `json:"seconds"`
	Latency struct {
		P50 float64 `json:"p50_ms"`
		P99 float64 `json:"p99_ms"`
	} `json:"latency"`
	Backends      []backendRow   `json:"backends"`
	ErrorMessages map[string]int `json:"error_messages,omitempty"`
}

func main() {
	var o options
	flag.StringVar(&o.target, "target", "", "HOST:PORT: all calls over one connection")
	flag.StringVar(&o.targets, "targets", "", "HOST:PORT,...: one connection per backend, grpc-go round_robin over them")
	flag.IntVar(&o.conc, "c", 50, "concurrent workers, each one call at a time")
	flag.IntVar(&o.total, "n", 0, "calls to make (0: until -duration)")
	flag.IntVar(&o.rate, "rate", 0, "calls started per second (0: as fast as the workers go)")
	flag.DurationVar(&o.duration, "duration", 0, "bound on the run (0: none; needs -n)")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Second, "deadline of each call")
	flag.IntVar(&o.size, "size", 100, "request and response payload bytes (unary)")
	flag.BoolVar(&o.stream, "stream", false, "StreamingOutputCall, 16 x 64 KiB responses, instead of UnaryCall")
	flag.StringVar(&o.caCert, "cacert", "", "PEM CA file: speak TLS, verifying the server against it")
	flag.StringVar(&o.serverName, "servername", "localhost", "with -cacert: name the server certificate is checked against")
	flag.Parse()
	rep, err := run(o)
	if err == nil {
		err = json.NewEncoder(os.Stdout).Encode(rep)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		os.Exit(1)
	}
}

// run makes the calls o describes and reports them.
func run(o options) (*report, error) {
	if (o.target == "") == (o.targets == "") {
		return nil, errors.New("give exactly one of -target and -targets")
	}
	if o.conc <= 0 || o.total < 0 || o.rate < 0 || o.size < 0 {
		return nil, errors.New("-c must be positive; -n, -rate and -size not negative")
	}
	if o.total == 0 && o.duration <= 0 {
		return nil, errors.New("give -n, -duration or both")
	}
	addrs := strings.Split(o.target+o.targets, ",")
	for _, a := range addrs {
		host, _, err := net.SplitHostPort(a)
		if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
			return nil, fmt.Errorf("target %q: want a loopback HOST:PORT", a)
		}
	}
	creds := insecure.NewCredentials()
	if o.caCert != "" {
		pem, err := os.ReadFile(o.caCert)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s: no PEM certificates", o.caCert)
		}
		creds = credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: o.serverName})
	}
	dopts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	target := "passthrough:///" + o.target
	if o.targets != "" {
		r := manual.NewBuilderWithScheme("genrr")
		var st resolver.State
		for _, a := range addrs {
			st.Addresses = append(st.Addresses, resolver.Address{Addr: a})
		}
		r.InitialState(st)
		dopts = append(dopts, grpc.WithResolvers(r),
			grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`))
		target = "genrr:///backends"
	}
	cc, err := grpc.NewClient(target, dopts...)
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	client := testgrpc.NewTestServiceClient(cc)

	// Wait for the connections before the clock starts: with -targets,
	// until the last len(addrs) calls went to as many backends, so every
	// subchannel is in round_robin's picker.
	if err := warmUp(client, len(addrs)); err != nil {
		return nil, err
	}

	// The clock starts once the connections are up.
	ctx := context.Background()
	if o.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.duration)
		defer cancel()
	}

	// Calls are handed out by a counter (-n) and, with -rate, by a pacer.
	var issued atomic.Int64
	take := func() bool { return o.total == 0 || issued.Add(1) <= int64(o.total) }
	start := time.Now()
	var tokens chan struct{}
	if o.rate > 0 {
		tokens = make(chan struct{}, o.conc)
		go pace(ctx, o.rate, tokens)
	}

	type workerResult struct {
		lat      []time.Duration
		backends map[string]int
		errs     map[string]int
	}
	results := make([]workerResult, o.conc)
	var wg sync.WaitGroup
	for w := range o.conc {
		wg.Add(1)
		go func(res *workerResult) {
			defer wg.Done()
			res.backends = map[string]int{}
			res.errs = map[string]int{}
			req := &testgrpc.SimpleRequest{
				ResponseSize: int32(o.size),
				Payload:      &testgrpc.Payload{Body: make([]byte, o.size)},
			}
			sreq := &testgrpc.StreamingOutputCallRequest{}
			for range 16 {
				sreq.ResponseParameters = append(sreq.ResponseParameters, &testgrpc.ResponseParameters{Size: 64 << 10})
			}
			for take() {
				if tokens != nil {
					select {
					case <-tokens:
					case <-ctx.Done():
						return
					}
				}
				if ctx.Err() != nil {
					return
				}
				cctx, cancel := context.WithTimeout(context.Background(), o.timeout)
				t0 := time.Now()
				var name string
				var err error
				if o.stream {
					name, err = streamCall(cctx, client, sreq)
				} else {
					var resp *testgrpc.SimpleResponse
					resp, err = client.UnaryCall(cctx, req)
					name = resp.GetServerId()
				}
				res.lat = append(res.lat, time.Since(t0))
				cancel()
				if err != nil {
					res.errs[status.Convert(err).String()]++
					continue
				}
				res.backends[name]++
			}
		}(&results[w])
	}
	wg.Wait()
	elapsed := time.Since(start)

	var rep report
	var lat []time.Duration
	backends := map[string]int{}
	for _, r := range results {
		lat = append(lat, r.lat...)
		for k, v := range r.backends {
			backends[k] += v
		}
		for k, v := range r.errs {
			if rep.ErrorMessages == nil {
				rep.ErrorMessages = map[string]int{}
			}
			rep.ErrorMessages[k] += v
			rep.Errors += v
		}
	}
	rep.Count = len(lat)
	rep.Seconds = elapsed.Seconds()
	rep.RPS = float64(rep.Count) / elapsed.Seconds()
	slices.Sort(lat)
	rep.Latency.P50 = ms(pct(lat, 0.50))
	rep.Latency.P99 = ms(pct(lat, 0.99))
	names := make([]string, 0, len(backends))
	for k := range backends {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		rep.Backends = append(rep.Backends, backendRow{Name: k, Count: backends[k], Share: 100 * float64(backends[k]) / float64(max(rep.Count, 1))})
	}
	return &rep, nil
}

// warmUp makes calls until the last n of them landed on n different
// backends, for at most 10 seconds.
func warmUp(client testgrpc.TestServiceClient, n int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var last []string
	for {
		resp, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.WaitForReady(true))
		if err != nil {
			return fmt.Errorf("warm-up call: %w", err)
		}
		last = append(last, resp.GetServerId())
		if len(last) > n {
			last = last[1:]
		}
		seen := map[string]bool{}
		for _, s := range last {
			seen[s] = true
		}
		if len(seen) == n {
			return nil
		}
	}
}

// streamCall makes one server-streaming call, reads it to the end and
// returns the backend named in its x-backend header.
func streamCall(ctx context.Context, client testgrpc.TestServiceClient, req *testgrpc.StreamingOutputCallRequest) (string, error) {
	st, err := client.StreamingOutputCall(ctx, req)
	if err != nil {
		return "", err
	}
	for {
		if _, err := st.Recv(); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return "", err
		}
	}
	md, err := st.Header()
	if err != nil {
		return "", err
	}
	if v := md.Get("x-backend"); len(v) > 0 {
		return v[0], nil
	}
	return "", nil
}

// pace puts rate tokens a second into tokens until ctx ends; a token not
// taken in time is dropped, as a fixed-rate client does not make up for
// lost calls by bursting.
func pace(ctx context.Context, rate int, tokens chan<- struct{}) {
	const tick = time.Millisecond
	t := time.NewTicker(tick)
	defer t.Stop()
	start := time.Now()
	sent := 0
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			due := int(now.Sub(start).Seconds() * float64(rate))
			for ; sent < due; sent++ {
				select {
				case tokens <- struct{}{}:
				default:
				}
			}
		}
	}
}

func pct(s []time.Duration, q float64) time.Duration {
	if len(s) == 0 {
		return 0
	}
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
