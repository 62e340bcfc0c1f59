package director

import (
	"context"
	"fmt"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// Active health checks over grpc.health.v1 (Health.Check), after Envoy's
// gRPC health checker and CoreDNS's up package.
//
// Run (run.go) owns one checker goroutine per backend of the current set. A checker
// owns its own client connection, probes once at start and then on every
// tick, one probe at a time (a tick that comes while a probe runs is
// dropped), and counts results in a row (healthRun). When the verdict
// flips it calls setHealth, which records it in the backend's counters
// under mu and publishes a snapshot; the snapshot's ready list leaves out
// unhealthy backends, so policies never see health.
//
// Choices, and why:
//   - A new backend is healthy until a check says otherwise (Envoy would
//     hold it back until its first check passes). Availability first: a
//     scale-up takes effect at once, and the proxy's own failure counting
//     (outlier.go) covers a new backend that is broken.
//   - NOT_SERVING and SERVICE_UNKNOWN make a backend unhealthy at once:
//     the backend said so itself, so there is nothing to confirm. Errors
//     (timeouts, refused connections) must repeat UnhealthyThreshold times,
//     as one lost probe should not take a backend out.
//   - Unimplemented (no health service) counts as healthy, as gRFC A17
//     prescribes for gRPC clients, and is logged once per checker: a
//     backend without the service would otherwise never get traffic.
//   - If no backend is healthy, picks go to all of them (panic mode, as
//     Envoy's panic threshold, here at 0%): the checks are more likely
//     wrong than the whole fleet down, and failing every stream is worst.

// healthConfig is the validated health-check part of a Config.
type healthConfig struct {
	interval       time.Duration // 0 disables checks
	timeout        time.Duration
	service        string
	healthyAfter   int
	unhealthyAfter int
	creds          credentials.TransportCredentials // nil: cleartext
}

func newHealthConfig(cfg Config) (healthConfig, error) {
	hc := healthConfig{
		interval:       cfg.HealthCheckInterval,
		timeout:        cfg.HealthCheckTimeout,
		service:        cfg.HealthCheckService,
		healthyAfter:   cfg.HealthyThreshold,
		unhealthyAfter: cfg.UnhealthyThreshold,
		creds:          cfg.HealthCredentials,
	}
	switch {
	case hc.interval < 0:
		return hc, fmt.Errorf("director: health check interval %v is negative", hc.interval)
	case hc.interval > 0 && hc.interval < MinHealthCheckInterval:
		// 1ns meant a check per backend as soon as the last one ended.
		return hc, fmt.Errorf("director: health check interval %v under the minimum %v", hc.interval, MinHealthCheckInterval)
	case hc.timeout < 0:
		return hc, fmt.Errorf("director: health check timeout %v is negative", hc.timeout)
	case hc.healthyAfter < 0:
		return hc, fmt.Errorf("director: healthy threshold %d is negative", hc.healthyAfter)
	case hc.unhealthyAfter < 0:
		return hc, fmt.Errorf("director: unhealthy threshold %d is negative", hc.unhealthyAfter)
	}
	if hc.timeout == 0 {
		hc.timeout = DefaultHealthCheckTimeout
	}
	if hc.healthyAfter == 0 {
		hc.healthyAfter = DefaultHealthyThreshold
	}
	if hc.unhealthyAfter == 0 {
		hc.unhealthyAfter = DefaultUnhealthyThreshold
	}
	return hc, nil
}

// checker is Run's handle on one checker goroutine.
type checker struct {
	ctr    *counters // the backend's counters when the checker started
	cancel context.CancelFunc
}

// syncCheckers stops the checkers of backends that left the set and starts
// checkers for backends that joined it. A backend that left and came back
// has fresh counters and gets a fresh checker. Only Run calls it.
func (d *Director) syncCheckers(ctx context.Context, wg *sync.WaitGroup, checkers map[string]checker) {
	d.mu.Lock()
	cur := make(map[string]*counters, len(d.counters))
	for addr, c := range d.counters {
		cur[addr] = c
	}
	d.mu.Unlock()

	for addr, c := range checkers {
		if cur[addr] != c.ctr {
			c.cancel()
			delete(checkers, addr)
		}
	}
	for addr, ctr := range cur {
		if _, ok := checkers[addr]; ok {
			continue
		}
		cctx, cancel := context.WithCancel(ctx)
		checkers[addr] = checker{ctr: ctr, cancel: cancel}
		wg.Go(func() { d.checkLoop(cctx, addr, ctr) })
	}
}

// probeResult is what one health check says.
type probeResult int

const (
	probePass probeResult = iota
	// probeFail is an error: timeout, connection failure, bad answer. It
	// counts toward UnhealthyThreshold.
	probeFail
	// probeNotServing is the backend saying it is not serving: NOT_SERVING,
	// SERVICE_UNKNOWN or UNKNOWN. It makes the backend unhealthy at once.
	probeNotServing
)

// checkLoop checks one backend until ctx is cancelled. It is the checker
// goroutine; a panic in it is logged and ends only this checker.
func (d *Director) checkLoop(ctx context.Context, addr string, ctr *counters) {
	defer func() {
		if r := recover(); r != nil {
			d.logger.Error("health checker panicked; backend no longer checked",
				"backend", addr, "panic", r, "stack", string(debug.Stack()))
		}
	}()
	p, err := d.dialHealth(addr, d.health)
	if err != nil {
		d.logger.Error("cannot health-check backend", "backend", addr, "err", err)
		return
	}
	defer p.Close()

	// A backend starts healthy, unless its director inherited a verdict
	// (Inherit): the checks go on from it.
	d.mu.Lock()
	healthy := !ctr.unhealthy
	d.mu.Unlock()
	hr := healthRun{healthyAfter: d.health.healthyAfter, unhealthyAfter: d.health.unhealthyAfter, healthy: healthy}
	warnedUnimplemented := false
	t := time.NewTicker(d.health.interval)
	defer t.Stop()
	for {
		st, err := d.probe(ctx, p)
		if ctx.Err() != nil {
			return // a probe cut short by Run says nothing
		}
		res := probePass
		switch {
		case status.Code(err) == codes.Unimplemented:
			if !warnedUnimplemented {
				warnedUnimplemented = true
				d.logger.Warn("backend does not implement grpc.health.v1; treating it as healthy", "backend", addr)
			}
			err = nil
		case err != nil:
			res = probeFail
		case st != healthpb.HealthCheckResponse_SERVING:
			res = probeNotServing
		}
		if hr.observe(res) {
			d.setHealth(addr, ctr, hr.healthy, st, err)
		}
		if res == probePass && hr.healthy && d.ejectedNow(addr, ctr) {
			// Envoy's successful_active_health_check_uneject_host
			// (uneject.go).
			d.unejectEarly(addr, ctr, "active health check passed")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// probe runs one check bounded by the health-check timeout.
func (d *Director) probe(ctx context.Context, p healthProber) (healthpb.HealthCheckResponse_ServingStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, d.health.timeout)
	defer cancel()
	return p.check(ctx)
}

// healthRun turns probe results into a verdict with hysteresis. It is
// owned by one checker goroutine.
type healthRun struct {
	healthyAfter, unhealthyAfter int
	healthy                      bool
	// run counts results in a row that contradict the verdict.
	run int
}

// observe records one result and reports whether the verdict flipped.
func (h *healthRun) observe(r probeResult) bool {
	if (r == probePass) == h.healthy {
		h.run = 0
		return false
	}
	h.run++
	need := h.healthyAfter
	if h.healthy {
		need = h.unhealthyAfter
		if r == probeNotServing {
			need = 1
		}
	}
	if h.run < need {
		return false
	}
	h.healthy = !h.healthy
	h.run = 0
	return true
}

// setHealth records a new verdict for the backend at addr with counters
// ctr, unless it has left the set since, and publishes a snapshot. A
// backend that becomes healthy again slow-starts. st and err are the last
// probe's outcome, for the log.
func (d *Director) setHealth(addr string, ctr *counters, healthy bool, st healthpb.HealthCheckResponse_ServingStatus, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.counters[addr] != ctr || ctr.unhealthy == !healthy {
		return
	}
	now := d.now()
	ctr.unhealthy = !healthy
	switch {
	case healthy:
		if d.slowStart > 0 {
			ctr.slowStartAt = now
		}
		d.logger.Info("backend healthy", "backend", addr)
	case err != nil:
		ctr.unhealthyReason = fmt.Sprintf("health check failed: %v", err)
		d.logger.Info("backend unhealthy", "backend", addr, "err", err)
	default:
		ctr.unhealthyReason = "health check answered " + st.String()
		d.logger.Info("backend unhealthy", "backend", addr, "status", st.String())
	}
	d.publishLocked(cloneBackends(d.snap.Load().all), now)
}

// forgetHealth marks every backend healthy, when Run ends.
func (d *Director) forgetHealth() {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, c := range d.counters {
		if c.unhealthy {
			c.unhealthy = false
			n++
		}
	}
	if n > 0 {
		d.logger.Info("health checks stopped; unhealthy backends count as healthy again", "backends", n)
		d.publishLocked(cloneBackends(d.snap.Load().all), d.now())
	}
}

// healthProber checks one backend. Run's checker owns it and closes it.
type healthProber interface {
	check(ctx context.Context) (healthpb.HealthCheckResponse_ServingStatus, error)
	Close() error
}

// grpcHealth is the healthProber over a grpc-go client connection.
type grpcHealth struct {
	conn    *grpc.ClientConn
	client  healthpb.HealthClient
	service string
}

// dialGRPCHealth creates a client for addr's grpc.health.v1 service. The
// connection is made lazily by the first check, with the configured
// transport credentials (cleartext when none, as the proxy's own backend
// connections) and without HTTP proxies. Reconnect
// backoff is capped near the check interval so that a backend that comes
// back is noticed within a few intervals rather than grpc-go's default of
// up to two minutes.
func dialGRPCHealth(addr string, hc healthConfig) (healthProber, error) {
	bo := backoff.DefaultConfig
	bo.BaseDelay = min(hc.interval, time.Second)
	bo.MaxDelay = max(hc.interval, time.Second)
	creds := hc.creds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	// The target is a URL: escape the "%" of an IPv6 zone
	// ("[fe80::1%eth0]:port"), which the passthrough resolver gets back
	// unescaped as the address to dial.
	conn, err := grpc.NewClient("passthrough:///"+strings.ReplaceAll(addr, "%", "%25"),
		grpc.WithTransportCredentials(creds),
		grpc.WithNoProxy(),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: hc.timeout}),
	)
	if err != nil {
		return nil, fmt.Errorf("director: health client for %s: %w", addr, err)
	}
	return &grpcHealth{conn: conn, client: healthpb.NewHealthClient(conn), service: hc.service}, nil
}

func (g *grpcHealth) check(ctx context.Context) (healthpb.HealthCheckResponse_ServingStatus, error) {
	resp, err := g.client.Check(ctx, &healthpb.HealthCheckRequest{Service: g.service})
	if err != nil {
		return healthpb.HealthCheckResponse_UNKNOWN, err
	}
	return resp.GetStatus(), nil
}

func (g *grpcHealth) Close() error { return g.conn.Close() }
