//go:build unix

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
// error_messages, cpu_ms (the generator's own CPU over the calls).
//
//	go run ./loadtest/bench/gen -target 127.0.0.1:8080 -c 50 -n 20000
//	go run ./loadtest/bench/gen -targets 127.0.0.1:9001,127.0.0.1:9002,127.0.0.1:9003 -c 50 -n 20000
//	go run ./loadtest/bench/gen -target 127.0.0.1:8080 -c 50 -rate 2000 -duration 5s
//
// For fault runs (loadtest/bench/rolling.sh): -stream-workers N adds N
// workers making server streams beside the unary ones, on the same
// connection; -ready FILE is created once the warm-up is done and the
// clock runs; SIGUSR1 marks the start of the "after" window (the calls
// started from then on are also reported on their own, with their split
// over the backends); SIGINT or SIGTERM stops starting calls, lets the
// calls in flight finish and reports. The report then counts failures by
// gRPC status code and by kind of call.
//
//	gen -target 127.0.0.1:8080 -c 50 -stream-workers 2 -duration 60s -ready /tmp/ready
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
	"os/signal"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
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
	streamWorkers   int
	ready           string
	// stop, when closed, ends the load as -duration does; mark, when
	// closed, starts the "after" window. Either may be nil.
	stop, mark <-chan struct{}
}

type backendRow struct {
	Name  string  `json:"name"`
	Count int     `json:"count"`
	Share float64 `json:"share"`
	// GapMS is the longest time, in milliseconds, between two calls
	// that this backend answered (by their ends), and GapEnd the Unix
	// time in seconds of the call that ended it: after a backend is
	// killed and restarted, GapEnd minus the restart is how long the
	// proxy took to send it calls again.
	GapMS  float64 `json:"gap_ms,omitempty"`
	GapEnd float64 `json:"gap_end,omitempty"`
}

type report struct {
	Count   int     `json:"count"`
	Errors  int     `json:"errors"`
	RPS     float64 `json:"rps"`
	Seconds float64 `json:"seconds"`
	// CPUMS is the generator's own CPU time, in ms, over the calls (from
	// the end of the warm-up to the last call's end): run.sh reports it
	// per call beside the backends', since the generator and the backends
	// share one CPU and that CPU, not the proxy, bounds calls/s. Absent
	// where the OS cannot tell.
	CPUMS float64 `json:"cpu_ms,omitempty"`
	// End is the Unix time in seconds when the last call ended.
	End     float64 `json:"end"`
	Latency struct {
		P50 float64 `json:"p50_ms"`
		P99 float64 `json:"p99_ms"`
	} `json:"latency"`
	Backends      []backendRow   `json:"backends"`
	ErrorMessages map[string]int `json:"error_messages,omitempty"`
	// ErrorCodes counts failed calls by gRPC status code name.
	ErrorCodes map[string]int `json:"error_codes,omitempty"`
	// Kinds splits calls and failures by kind, "unary" and "stream".
	Kinds map[string]*kindRow `json:"kinds"`
	// After covers the calls started after the mark (SIGUSR1), when one
	// was given.
	After *afterReport `json:"after,omitempty"`
}

type kindRow struct {
	Count  int `json:"count"`
	Errors int `json:"errors"`
}

type afterReport struct {
	Count      int            `json:"count"`
	Errors     int            `json:"errors"`
	ErrorCodes map[string]int `json:"error_codes,omitempty"`
	Backends   []backendRow   `json:"backends"`
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
	flag.IntVar(&o.streamWorkers, "stream-workers", 0, "further workers making server streams (16 x 64 KiB) on the same connection, beside the -c unary ones")
	flag.StringVar(&o.ready, "ready", "", "FILE to create once the warm-up is done and the clock runs")
	flag.Parse()
	stop, mark := make(chan struct{}), make(chan struct{})
	o.stop, o.mark = stop, mark
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGUSR1)
	go func() {
		var stopped, marked bool
		for s := range sigs {
			switch {
			case s == syscall.SIGUSR1 && !marked:
				marked = true
				close(mark)
			case s != syscall.SIGUSR1 && !stopped:
				stopped = true
				close(stop)
			}
		}
	}()
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
	if o.conc <= 0 || o.total < 0 || o.rate < 0 || o.size < 0 || o.streamWorkers < 0 {
		return nil, errors.New("-c must be positive; -n, -rate, -size and -stream-workers not negative")
	}
	if o.streamWorkers > 0 && o.stream {
		return nil, errors.New("-stream-workers goes with unary load, not with -stream")
	}
	if o.streamWorkers > 0 && o.duration <= 0 {
		return nil, errors.New("-stream-workers needs -duration: stream workers run until it ends")
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
	ctx, cancelLoad := context.WithCancel(context.Background())
	defer cancelLoad()
	if o.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.duration)
		defer cancel()
	}
	if o.stop != nil {
		go func() {
			select {
			case <-o.stop:
				cancelLoad()
			case <-ctx.Done():
			}
		}()
	}
	// marked is set when the "after" window starts.
	var marked atomic.Bool
	if o.mark != nil {
		go func() {
			select {
			case <-o.mark:
				marked.Store(true)
			case <-ctx.Done():
			}
		}()
	}
	if o.ready != "" {
		if err := os.WriteFile(o.ready, nil, 0o644); err != nil {
			return nil, err
		}
	}

	// Calls are handed out by a counter (-n) and, with -rate, by a pacer.
	var issued atomic.Int64
	take := func() bool { return o.total == 0 || issued.Add(1) <= int64(o.total) }
	start, cpu0 := time.Now(), processCPU()
	var tokens chan struct{}
	if o.rate > 0 {
		tokens = make(chan struct{}, o.conc)
		go pace(ctx, o.rate, tokens)
	}

	type workerResult struct {
		stream   bool
		lat      []time.Duration
		backends map[string]int
		// ends holds, per backend, the Unix nanoseconds at which its
		// calls ended, for the gaps in the report.
		ends  map[string][]int64
		errs  map[string]int
		codes map[codes.Code]int
		// Calls started after the mark.
		after, afterErrs int
		afterBackends    map[string]int
		afterCodes       map[codes.Code]int
	}
	results := make([]workerResult, o.conc+o.streamWorkers)
	var wg sync.WaitGroup
	for w := range results {
		wg.Add(1)
		go func(res *workerResult) {
			defer wg.Done()
			res.stream = o.stream || w >= o.conc
			res.backends = map[string]int{}
			res.ends = map[string][]int64{}
			res.errs = map[string]int{}
			res.codes = map[codes.Code]int{}
			res.afterBackends = map[string]int{}
			res.afterCodes = map[codes.Code]int{}
			req := &testgrpc.SimpleRequest{
				ResponseSize: int32(o.size),
				Payload:      &testgrpc.Payload{Body: make([]byte, o.size)},
			}
			sreq := &testgrpc.StreamingOutputCallRequest{}
			for range 16 {
				sreq.ResponseParameters = append(sreq.ResponseParameters, &testgrpc.ResponseParameters{Size: 64 << 10})
			}
			for res.stream && !o.stream || take() {
				if tokens != nil && !res.stream {
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
				after := marked.Load()
				t0 := time.Now()
				var name string
				var err error
				if res.stream {
					name, err = streamCall(cctx, client, sreq)
				} else {
					var resp *testgrpc.SimpleResponse
					resp, err = client.UnaryCall(cctx, req)
					name = resp.GetServerId()
				}
				res.lat = append(res.lat, time.Since(t0))
				cancel()
				if after {
					res.after++
				}
				if err != nil {
					st := status.Convert(err)
					res.errs[st.String()]++
					res.codes[st.Code()]++
					if after {
						res.afterErrs++
						res.afterCodes[st.Code()]++
					}
					continue
				}
				res.backends[name]++
				res.ends[name] = append(res.ends[name], time.Now().UnixNano())
				if after {
					res.afterBackends[name]++
				}
			}
		}(&results[w])
	}
	wg.Wait()
	elapsed, cpu := time.Since(start), processCPU()
	end := float64(time.Now().UnixNano()) / 1e9

	var rep report
	var lat []time.Duration
	backends, afterBackends := map[string]int{}, map[string]int{}
	ends := map[string][]int64{}
	rep.Kinds = map[string]*kindRow{}
	if o.mark != nil {
		select {
		case <-o.mark:
			rep.After = &afterReport{}
		default:
		}
	}
	for _, r := range results {
		lat = append(lat, r.lat...)
		kind := "unary"
		if r.stream {
			kind = "stream"
		}
		if rep.Kinds[kind] == nil {
			rep.Kinds[kind] = &kindRow{}
		}
		rep.Kinds[kind].Count += len(r.lat)
		for k, v := range r.backends {
			backends[k] += v
		}
		for k, v := range r.ends {
			ends[k] = append(ends[k], v...)
		}
		for c, v := range r.codes {
			if rep.ErrorCodes == nil {
				rep.ErrorCodes = map[string]int{}
			}
			rep.ErrorCodes[c.String()] += v
			rep.Kinds[kind].Errors += v
		}
		if rep.After != nil {
			rep.After.Count += r.after
			rep.After.Errors += r.afterErrs
			for k, v := range r.afterBackends {
				afterBackends[k] += v
			}
			for c, v := range r.afterCodes {
				if rep.After.ErrorCodes == nil {
					rep.After.ErrorCodes = map[string]int{}
				}
				rep.After.ErrorCodes[c.String()] += v
			}
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
	rep.End = end
	rep.RPS = float64(rep.Count) / elapsed.Seconds()
	if cpu0 >= 0 && cpu >= cpu0 {
		rep.CPUMS = float64(cpu-cpu0) / 1e6
	}
	slices.Sort(lat)
	rep.Latency.P50 = ms(pct(lat, 0.50))
	rep.Latency.P99 = ms(pct(lat, 0.99))
	rep.Backends = split(backends, rep.Count)
	for i := range rep.Backends {
		rep.Backends[i].GapMS, rep.Backends[i].GapEnd = longestGap(ends[rep.Backends[i].Name])
	}
	if rep.After != nil {
		rep.After.Backends = split(afterBackends, rep.After.Count)
	}
	return &rep, nil
}

// split lists the calls per backend, by name, with their share of total.
func split(backends map[string]int, total int) []backendRow {
	names := make([]string, 0, len(backends))
	for k := range backends {
		names = append(names, k)
	}
	sort.Strings(names)
	var rows []backendRow
	for _, k := range names {
		rows = append(rows, backendRow{Name: k, Count: backends[k], Share: 100 * float64(backends[k]) / float64(max(total, 1))})
	}
	return rows
}

// longestGap returns the longest time between two of the call ends in ns
// (Unix nanoseconds, in any order), in milliseconds, and the end that
// closed it, in Unix seconds; zeros if there are fewer than two.
func longestGap(ns []int64) (gapMS, end float64) {
	slices.Sort(ns)
	var best int64
	for i := 1; i < len(ns); i++ {
		if g := ns[i] - ns[i-1]; g > best {
			best = g
			end = float64(ns[i]) / 1e9
		}
	}
	return float64(best) / 1e6, end
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
