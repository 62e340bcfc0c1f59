// Package demo is the headless-service demo, on one machine and without a
// cluster: an embedded DNS server stands in for cluster DNS and answers a
// headless service's name with one A record per "pod"; testservers on
// 127.0.0.x addresses, all on one port, stand in for the pods. streamlb,
// built by the same wiring as the proxy command, re-resolves the name; one
// client keeps ONE connection to it and sends steady load. Beside it, a
// plain grpc-go client dials the same name directly with the default dns
// resolver and pick_first, as most gRPC clients in a cluster do. The demo
// scales the pods through Config.Steps by changing the records and
// starting and stopping testservers, and prints where the calls of both
// clients land.
//
// With Config.Registry set to RegistryEtcd the pods instead register
// themselves in an embedded etcd, in Kitex's format with a lease, and
// streamlb watches it; the direct client resolved the registry once, at
// start. On the first scale-in one pod is killed without deregistering, so
// its lease has to expire before streamlb drops it.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	grpcresolver "google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	"github.com/streamlb/streamlb/cluster"
	"github.com/streamlb/streamlb/testserver"
)

// Defaults for Config fields left zero.
const (
	DefaultStepDuration = 8 * time.Second
	DefaultRefresh      = time.Second
	DefaultRate         = 200
	DefaultConcurrency  = 8
	DefaultInterval     = time.Second
	DefaultName         = "grpc-echo.demo.svc.cluster.local"
	DefaultLeaseTTL     = 5 * time.Second
	demoMaxPods         = 50
	demoFirstIP         = 11 // pod i listens on 127.0.0.(demoFirstIP+i)
)

// DefaultSteps is the default scaling plan: 3 pods, then 5, then 2.
var DefaultSteps = []int{3, 5, 2}

// Config configures Run. The zero value runs the default demo,
// which ends by itself in about half a minute.
type Config struct {
	// Steps are the pod counts, one per step; nil means DefaultSteps.
	Steps []int
	// StepDuration is how long load runs at each step.
	StepDuration time.Duration
	// Refresh is streamlb's DNS re-resolution interval.
	Refresh time.Duration
	// Rate is the calls per second each client sends.
	Rate int
	// Concurrency bounds each client's calls in flight, all on its one
	// connection.
	Concurrency int
	// Interval is how often the live table is printed; negative means
	// never (only the step and final summaries).
	Interval time.Duration
	// Registry is how the pods are published: RegistryDNS (also "") or
	// RegistryEtcd.
	Registry string
	// LeaseTTL is the etcd lease of each pod's registration, so how long
	// a killed pod stays registered; zero means DefaultLeaseTTL.
	LeaseTTL time.Duration
	// Logger receives the components' logs; nil means slog.Default().
	Logger *slog.Logger
}

// Validate reports a field Run would reject.
func (c Config) Validate() error {
	var errs []error
	for _, n := range c.Steps {
		if n < 1 || n > demoMaxPods {
			errs = append(errs, fmt.Errorf("demo: every step needs 1..%d pods, got %d", demoMaxPods, n))
		}
	}
	if c.StepDuration < 0 || c.Refresh < 0 {
		errs = append(errs, errors.New("demo: durations must not be negative"))
	}
	if c.Rate < 0 || c.Concurrency < 0 {
		errs = append(errs, errors.New("demo: rate and concurrency must not be negative"))
	}
	if c.Registry != "" && c.Registry != RegistryDNS && c.Registry != RegistryEtcd {
		errs = append(errs, fmt.Errorf("demo: registry %q: want %q or %q", c.Registry, RegistryDNS, RegistryEtcd))
	}
	if c.LeaseTTL != 0 && c.LeaseTTL < 2*time.Second {
		errs = append(errs, fmt.Errorf("demo: lease TTL %v below etcd's minimum of 2s", c.LeaseTTL))
	}
	return errors.Join(errs...)
}

func (c Config) withDefaults() Config {
	if c.Steps == nil {
		c.Steps = DefaultSteps
	}
	if c.StepDuration == 0 {
		c.StepDuration = DefaultStepDuration
	}
	if c.Refresh == 0 {
		c.Refresh = DefaultRefresh
	}
	if c.Rate == 0 {
		c.Rate = DefaultRate
	}
	if c.Concurrency == 0 {
		c.Concurrency = DefaultConcurrency
	}
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.Registry == "" {
		c.Registry = RegistryDNS
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = DefaultLeaseTTL
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

// Client names in Result and the tables.
const (
	ViaProxy = "via streamlb"
	Direct   = "direct grpc-go"
)

// Step is what happened during one step.
type Step struct {
	// Pods are the names of the pods in the set during the step.
	Pods []string
	// Calls holds, per client (ViaProxy, Direct), the calls each pod
	// served during the step.
	Calls map[string]map[string]int64
	// Errors holds each client's failed calls during the step.
	Errors map[string]int64
}

// Result is the outcome of Run, one entry per step.
type Result struct {
	Steps []Step
	// ChangeErrors holds, per change between steps, each client's calls
	// that failed while streamlb followed it.
	ChangeErrors []map[string]int64
}

// demo is one run's world. Its goroutines are owned by Run.
type demo struct {
	cfg  Config
	out  io.Writer
	log  *slog.Logger
	pub  publisher
	port int
	srv  *cluster.Server
	// killed is set once a pod was killed without deregistering; used by
	// Run's goroutine only.
	killed bool

	mu sync.Mutex
	// mu guards the fields below.
	pods   []*testserver.Server // pods[i] is "pod-(i+1)" on 127.0.0.(demoFirstIP+i)
	counts map[string]map[string]int64
	errs   map[string]int64
	// epoch counts resetCounts: a call is counted on its pod only in the
	// epoch (step) it was made in; see record.
	epoch int
}

// Run runs the headless-service demo and writes its tables to out. It
// blocks until the last step ends or ctx is cancelled, and returns after
// everything it started has stopped.
func Run(ctx context.Context, cfg Config, out io.Writer) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	d := &demo{cfg: cfg, out: out, log: cfg.Logger}
	d.resetCounts()

	if cfg.Registry == RegistryEtcd {
		p, err := newEtcdPublisher(cfg.LeaseTTL)
		if err != nil {
			return nil, err
		}
		d.pub = p
	} else {
		p, err := newDNSPublisher(cfg.Logger)
		if err != nil {
			return nil, err
		}
		d.pub = p
	}
	defer d.pub.close()
	defer d.stopPods(0)
	if err := d.scale(ctx, cfg.Steps[0]); err != nil {
		return nil, err
	}

	target := d.pub.target()
	srv, err := cluster.NewServer(cluster.ServerConfig{
		Cluster:      cluster.Config{Targets: []string{target}, DNSRefresh: cfg.Refresh},
		DrainTimeout: 5 * time.Second,
		Logger:       cfg.Logger,
	})
	if err != nil {
		return nil, err
	}
	d.srv = srv
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("demo: proxy: %w", err)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- srv.Run(ctx, ln, nil) }()
	defer func() {
		cancel()
		if err := <-ran; err != nil {
			d.log.Error("demo proxy", "err", err)
		}
	}()

	viaProxy, err := grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer viaProxy.Close()
	// A plain client of the same name, with grpc-go's own dns resolver
	// (which looks the name up again only when a connection breaks, at
	// most every 30 s) and its default pick_first policy. With a registry,
	// a client that read it once at start: grpc-go has no Kitex resolver.
	directTarget, directOpts := target, []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if cfg.Registry != RegistryDNS {
		r := manual.NewBuilderWithScheme("demo")
		var addrs []grpcresolver.Address
		for _, p := range d.currentPods() {
			addrs = append(addrs, grpcresolver.Address{Addr: d.podAddr(p)})
		}
		r.InitialState(grpcresolver.State{Addresses: addrs})
		directTarget, directOpts = "demo:///"+etcdService, append(directOpts, grpc.WithResolvers(r))
	}
	direct, err := grpc.NewClient(directTarget, directOpts...)
	if err != nil {
		return nil, err
	}
	defer direct.Close()

	if err := d.waitForSet(ctx, cfg.Steps[0]); err != nil {
		return nil, err
	}
	fmt.Fprintf(out, "%s; streamlb on %s\n", d.pub.describe(cfg.Refresh), ln.Addr())
	how := "dialing the name directly"
	if cfg.Registry != RegistryDNS {
		how = "dialing the pods it read from the registry at start"
	}
	fmt.Fprintf(out, "two clients, ONE connection each, %d calls/s each: %q through streamlb, %q %s\n\n",
		cfg.Rate, ViaProxy, Direct, how)

	load, lctx := errgroup.WithContext(ctx)
	load.Go(func() error { d.drive(lctx, ViaProxy, testgrpc.NewTestServiceClient(viaProxy)); return nil })
	load.Go(func() error { d.drive(lctx, Direct, testgrpc.NewTestServiceClient(direct)); return nil })

	result := &Result{}
	var runErr error
	for i, n := range cfg.Steps {
		if i > 0 {
			what := "DNS records changed"
			if cfg.Registry != RegistryDNS {
				what = "pods register / deregister"
			}
			fmt.Fprintf(out, "--- scaling %d -> %d pods: %s\n", len(d.currentPods()), n, what)
			start := time.Now()
			d.resetCounts()
			if err := d.rescale(ctx, n); err != nil {
				runErr = err
				break
			}
			_, errs := d.snapshot()
			if cfg.Registry == RegistryDNS {
				fmt.Fprintf(out, "--- streamlb followed the records in %v\n", time.Since(start).Round(time.Millisecond))
			} else {
				fmt.Fprintf(out, "--- streamlb followed the registry in %v; calls failed meanwhile: %d via streamlb, %d direct\n",
					time.Since(start).Round(time.Millisecond), errs[ViaProxy], errs[Direct])
			}
			result.ChangeErrors = append(result.ChangeErrors, errs)
		}
		step, err := d.runStep(ctx, i)
		if err != nil {
			runErr = err
			break
		}
		result.Steps = append(result.Steps, step)
	}
	cancel()
	load.Wait()
	if runErr != nil {
		return result, runErr
	}
	d.summary(result)
	return result, nil
}

// drive sends calls from one client at cfg.Rate with at most
// cfg.Concurrency in flight, until ctx ends.
func (d *demo) drive(ctx context.Context, client string, c testgrpc.TestServiceClient) {
	interval := time.Second / time.Duration(d.cfg.Rate)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	slots := make(chan struct{}, d.cfg.Concurrency)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		select {
		case slots <- struct{}{}:
		default:
			continue // all slots busy: skip this tick rather than queue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			epoch := d.currentEpoch()
			var hdr metadata.MD
			_, err := c.EmptyCall(cctx, &testgrpc.Empty{}, grpc.Header(&hdr))
			if ctx.Err() != nil {
				return // the demo is ending; not the client's failure
			}
			d.record(client, testserver.BackendFromHeader(hdr), err, epoch)
		}()
	}
}

// record counts a call made in epoch. A failure is always counted. A
// success is counted on its pod only if the counts were not reset since
// the call was made: the tables show where each step's calls were picked,
// and a call picked in the previous step (on a pod since removed) that
// ends just after the step changed belongs to the previous step, whose
// table is already printed.
func (d *demo) record(client, pod string, err error, epoch int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil {
		d.errs[client]++
		return
	}
	if epoch == d.epoch {
		d.counts[client][pod]++
	}
}

func (d *demo) currentEpoch() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.epoch
}

func (d *demo) resetCounts() (map[string]map[string]int64, map[string]int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	counts, errs := d.counts, d.errs
	d.counts = map[string]map[string]int64{ViaProxy: {}, Direct: {}}
	d.errs = map[string]int64{}
	d.epoch++
	return counts, errs
}

func (d *demo) snapshot() (map[string]map[string]int64, map[string]int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	counts := map[string]map[string]int64{}
	for c, m := range d.counts {
		counts[c] = map[string]int64{}
		for p, n := range m {
			counts[c][p] = n
		}
	}
	errs := map[string]int64{}
	for c, n := range d.errs {
		errs[c] = n
	}
	return counts, errs
}

// runStep runs load for one step, printing the live table.
func (d *demo) runStep(ctx context.Context, i int) (Step, error) {
	pods := d.currentPods()
	fmt.Fprintf(d.out, "=== step %d/%d: %d pods\n", i+1, len(d.cfg.Steps), len(pods))
	d.resetCounts()
	end := time.NewTimer(d.cfg.StepDuration)
	defer end.Stop()
	var tickC <-chan time.Time
	if d.cfg.Interval > 0 {
		t := time.NewTicker(d.cfg.Interval)
		defer t.Stop()
		tickC = t.C
	}
	start := time.Now()
	prev, _ := d.snapshot()
	for {
		select {
		case <-ctx.Done():
			return Step{}, ctx.Err()
		case <-tickC:
			cur, errs := d.snapshot()
			d.table(pods, cur, prev, errs, time.Since(start), d.cfg.Interval)
			prev = cur
			continue
		case <-end.C:
		}
		break
	}
	counts, errs := d.resetCounts()
	fmt.Fprintf(d.out, "step %d total:\n", i+1)
	d.table(pods, counts, nil, errs, d.cfg.StepDuration, 0)
	fmt.Fprintln(d.out)
	return Step{Pods: pods, Calls: counts, Errors: errs}, nil
}

// table prints one block: each pod's share of each client's calls since
// the step began and, with prev, its calls per second since prev.
func (d *demo) table(pods []string, cur, prev map[string]map[string]int64, errs map[string]int64, elapsed, since time.Duration) {
	var b strings.Builder
	fmt.Fprintf(&b, "  t=%-5s %-8s %-30s %-30s\n", elapsed.Round(time.Second/10), "POD", ViaProxy, Direct)
	for _, p := range allPods(pods, cur) {
		fmt.Fprintf(&b, "          %-8s", p)
		for _, c := range []string{ViaProxy, Direct} {
			total := int64(0)
			for _, n := range cur[c] {
				total += n
			}
			col := fmt.Sprintf("%6d calls %5s", cur[c][p], pct(cur[c][p], total))
			if prev != nil && since > 0 {
				col += fmt.Sprintf(" %4.0f/s", float64(cur[c][p]-prev[c][p])/since.Seconds())
			}
			fmt.Fprintf(&b, " %-30s", col)
		}
		b.WriteByte('\n')
	}
	fmt.Fprintf(&b, "          %-8s %-30s %-30s\n", "failed", fmt.Sprintf("%6d calls", errs[ViaProxy]), fmt.Sprintf("%6d calls", errs[Direct]))
	io.WriteString(d.out, b.String())
}

// allPods lists the step's pods, then any other pod that served calls.
func allPods(pods []string, counts map[string]map[string]int64) []string {
	out := slices.Clone(pods)
	for _, m := range counts {
		for p := range m {
			if !slices.Contains(out, p) {
				out = append(out, p)
			}
		}
	}
	return out
}

func pct(n, total int64) string {
	if total == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%", 100*float64(n)/float64(total))
}

// summary prints one line per step and client, and the lesson.
func (d *demo) summary(r *Result) {
	fmt.Fprintln(d.out, "=== summary")
	for i, s := range r.Steps {
		for _, c := range []string{ViaProxy, Direct} {
			used := 0
			var total int64
			for _, p := range s.Pods {
				if s.Calls[c][p] > 0 {
					used++
				}
				total += s.Calls[c][p]
			}
			fmt.Fprintf(d.out, "step %d (%d pods)  %-15s %6d calls on %d of %d pods, %d failed\n",
				i+1, len(s.Pods), c, total, used, len(s.Pods), s.Errors[c])
		}
	}
	if d.cfg.Registry != RegistryDNS {
		fmt.Fprintln(d.out, "\nstreamlb follows the registry: a pod gets calls as soon as it registers, a deregistered pod is")
		fmt.Fprintln(d.out, "drained first, a killed one is dropped when its lease expires. The direct client stays on the pod it")
		fmt.Fprintln(d.out, "connected to.")
		return
	}
	fmt.Fprintln(d.out, "\nstreamlb follows the records: new pods get calls within its refresh interval, removed pods")
	fmt.Fprintln(d.out, "are drained first. The direct client stays on the pod it connected to until that connection breaks.")
}

// currentPods returns the names of the running pods.
func (d *demo) currentPods() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	names := make([]string, len(d.pods))
	for i, p := range d.pods {
		names[i] = p.Name()
	}
	return names
}

// scale starts pods up to n (it only grows the set) and publishes the
// first n.
func (d *demo) scale(ctx context.Context, n int) error {
	d.mu.Lock()
	for i := len(d.pods); i < n; i++ {
		p, err := d.startPodLocked(i)
		if err != nil {
			d.mu.Unlock()
			return err
		}
		d.pods = append(d.pods, p)
	}
	d.mu.Unlock()
	return d.publish(ctx, n)
}

// startPodLocked starts pod i. The first pod picks the port every pod
// shares, as the pods of a Kubernetes Deployment do. Caller must hold mu.
func (d *demo) startPodLocked(i int) (*testserver.Server, error) {
	ts, err := testserver.New(testserver.Config{Name: fmt.Sprintf("pod-%d", i+1), Logger: d.log})
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.%d:%d", demoFirstIP+i, d.port)
	if err := ts.Start(addr); err != nil {
		return nil, fmt.Errorf("demo: start pod on %s: %w", addr, err)
	}
	if d.port == 0 {
		_, port, _ := net.SplitHostPort(ts.Addr())
		fmt.Sscan(port, &d.port)
	}
	return ts, nil
}

// publish makes the first n pods the published set.
func (d *demo) publish(ctx context.Context, n int) error {
	d.mu.Lock()
	addrs := make([]string, 0, n)
	for _, p := range d.pods[:min(n, len(d.pods))] {
		addrs = append(addrs, p.Addr())
	}
	d.mu.Unlock()
	return d.pub.publish(ctx, addrs)
}

// podAddr returns the address of the pod named name.
func (d *demo) podAddr(name string) string {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range d.pods {
		if p.Name() == name {
			return p.Addr()
		}
	}
	return ""
}

// rescale moves to n pods. Growing starts pods, then publishes them.
// Shrinking publishes the smaller set first, waits until streamlb has
// dropped the removed pods and they finished their calls, then stops
// them, as a Kubernetes endpoint update precedes a pod's termination. With
// a registry, the first shrink kills the last pod outright instead: it
// stops without deregistering, and streamlb drops it when its lease
// expires.
func (d *demo) rescale(ctx context.Context, n int) error {
	if n >= len(d.currentPods()) {
		if err := d.scale(ctx, n); err != nil {
			return err
		}
		return d.waitForSet(ctx, n)
	}
	if d.cfg.Registry != RegistryDNS && !d.killed {
		d.killed = true
		d.mu.Lock()
		victim := d.pods[len(d.pods)-1]
		d.pods = d.pods[:len(d.pods)-1]
		d.mu.Unlock()
		ttl := d.pub.kill(victim.Addr())
		victim.Stop()
		fmt.Fprintf(d.out, "--- %s killed without deregistering: its lease (TTL %v) has to expire\n", victim.Name(), ttl)
	}
	if err := d.publish(ctx, n); err != nil {
		return err
	}
	if err := d.waitForSet(ctx, n); err != nil {
		return err
	}
	d.stopPods(n)
	return nil
}

// waitForSet waits until the director's set has n backends.
func (d *demo) waitForSet(ctx context.Context, n int) error {
	ctx, cancel := context.WithTimeout(ctx, max(10*d.cfg.Refresh, 2*d.cfg.LeaseTTL)+5*time.Second)
	defer cancel()
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for len(d.srv.Cluster().Backends()) != n {
		select {
		case <-ctx.Done():
			return fmt.Errorf("demo: streamlb did not follow the pods to %d: %w", n, ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// stopPods stops every pod from index n on, gracefully: calls in flight
// finish first.
func (d *demo) stopPods(n int) {
	d.mu.Lock()
	var gone []*testserver.Server
	if n < len(d.pods) {
		gone = d.pods[n:]
		d.pods = d.pods[:n]
	}
	d.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range gone {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			p.Shutdown(ctx)
		}()
	}
	wg.Wait()
}
