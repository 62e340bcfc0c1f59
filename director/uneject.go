package director

import (
	"context"
	"fmt"
	"io"
	"net"
	"runtime/debug"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc/credentials"
)

// Ending an ejection early, when the backend is known to be back.
//
// An ejection lasts BaseEjection (10 s) times its multiplier. A backend
// killed and restarted on the same address is usually back within a
// second or two, and until its ejection ends its share of the calls goes
// to the others. Two things end an ejection sooner:
//
//   - With active health checks, a passing check of an ejected backend
//     ends its ejection at once, whatever caused it. This is Envoy's
//     successful_active_health_check_uneject_host, which defaults to true:
//     the check is the operator's statement of what "up" means.
//   - Without them, an ejection that followed connection failures (the
//     run of failures ended with refused or timed-out connects, handshakes
//     that did not finish, or connections lost with calls open: the
//     proxy's ConnectionFailure errors) is probed: Run keeps one prober
//     per such backend, which opens a TCP connection (with the health
//     checks' TLS credentials, the backend's own) and completes an HTTP/2
//     handshake, first after reconnectProbeFirst and then backing off to
//     reconnectProbeMax; the first handshake that completes ends the
//     ejection. An ejection that followed answers (the backend said
//     UNAVAILABLE itself) is never probed: a handshake proves nothing
//     about it. Nor is an ejection that came soon after the backend's
//     last one ended (its multiplier is above 1): a backend that takes
//     connections and then fails its calls, or crashes again at once,
//     serves its growing ejections in full, so it costs a run of
//     failures per ejection rather than one per probe.
//     Envoy without active checks keeps every ejection to its
//     end; HAProxy brings a server back as soon as its checks pass (its
//     default check is a TCP connect, `inter 2s rise 2`). Connection
//     failures are the case where a connect is the right check, so for
//     them we follow HAProxy and keep Envoy's rule for the rest.
//
// Either way the ejection ends as if it had run out: the run of failures
// starts afresh and the multiplier decays from then on, so a backend that
// fails again at once is ejected again, for longer.

// Bounds of the reconnect probes' backoff: the first probe comes
// reconnectProbeFirst after the ejection, each failed one doubles the
// wait up to reconnectProbeMax. One probe runs at a time per backend.
const (
	reconnectProbeFirst = 100 * time.Millisecond
	reconnectProbeMax   = time.Second
)

// prober is Run's handle on one reconnect prober goroutine.
type prober struct {
	ctr    *counters
	cancel context.CancelFunc
}

// syncProbers starts a prober for every backend of the current snapshot
// that is ejected after connection failures and has none, and stops the
// probers of backends that are no longer (ejection ended, backend left
// the set). Only Run calls it, without active health checks.
func (d *Director) syncProbers(ctx context.Context, wg *sync.WaitGroup, probers map[string]prober) {
	s := d.snap.Load()
	for addr, p := range probers {
		if b := findBackend(s.all, addr); b == nil || !b.probe || b.ctr != p.ctr {
			p.cancel()
			delete(probers, addr)
		}
	}
	for _, b := range s.all {
		if !b.probe {
			continue
		}
		if _, ok := probers[b.addr]; ok {
			continue
		}
		pctx, cancel := context.WithCancel(ctx)
		probers[b.addr] = prober{ctr: b.ctr, cancel: cancel}
		addr, ctr := b.addr, b.ctr
		wg.Go(func() { d.probeLoop(pctx, addr, ctr) })
	}
}

// probeLoop tries a handshake with the ejected backend at addr, backing
// off, until one completes (then it ends the ejection) or ctx is
// cancelled. It is a prober goroutine; a panic in it is logged and ends
// only this prober.
func (d *Director) probeLoop(ctx context.Context, addr string, ctr *counters) {
	defer func() {
		if r := recover(); r != nil {
			d.logger.Error("reconnect prober panicked", "backend", addr, "panic", r, "stack", string(debug.Stack()))
		}
	}()
	wait := reconnectProbeFirst
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, d.health.timeout)
		err := d.handshake(pctx, addr, d.health.creds)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			d.unejectEarly(addr, ctr, "a new connection completed its HTTP/2 handshake")
			return
		}
		d.logger.Debug("ejected backend still unreachable", "backend", addr, "err", err)
		wait = min(2*wait, reconnectProbeMax)
		t.Reset(wait)
	}
}

// unejectEarly ends the ejection of the backend at addr with counters
// ctr, unless it has left the set or is not ejected, and publishes a
// snapshot with it back. why is logged.
func (d *Director) unejectEarly(addr string, ctr *counters, why string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.counters[addr] != ctr || ctr.ejectedUntil.IsZero() {
		return
	}
	cur := d.snap.Load()
	b := findBackend(cur.all, addr)
	if b == nil {
		return
	}
	now := d.now()
	d.restoreLocked(b, now)
	d.logger.Info("backend restored early", "backend", addr, "reason", why)
	d.publishLocked(cloneBackends(cur.all), now)
}

// ejectedNow reports whether the current snapshot has the backend at addr,
// with counters ctr, ejected. It only reads the snapshot.
func (d *Director) ejectedNow(addr string, ctr *counters) bool {
	b := findBackend(d.snap.Load().all, addr)
	return b != nil && b.ctr == ctr && b.ejected
}

// h2Handshake is Director.handshake: it opens a connection to addr,
// secured with creds unless nil, sends the HTTP/2 client preface and
// SETTINGS (RFC 9113 §3.4) and waits for the server's SETTINGS, within
// ctx: its deadline or its cancellation ends the wait. It then says
// goodbye (GOAWAY, NO_ERROR) and closes the connection.
func h2Handshake(ctx context.Context, addr string, creds credentials.TransportCredentials) error {
	var dialer net.Dialer
	raw, err := dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	conn := raw
	defer func() { conn.Close() }()
	// The deadline bounds the handshake, but cancelling ctx (the backend
	// left the set, Run is returning) must end it too: a backend that
	// accepts connections and never answers would otherwise hold the
	// prober, and Run's return, for the whole timeout.
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		if err := raw.SetDeadline(dl); err != nil {
			return err
		}
	}
	if creds != nil {
		c, _, err := creds.ClientHandshake(ctx, addr, raw)
		if err != nil {
			return fmt.Errorf("tls handshake: %w", err)
		}
		conn = c
	}
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		return err
	}
	fr := http2.NewFramer(conn, conn)
	if err := fr.WriteSettings(); err != nil {
		return err
	}
	f, err := fr.ReadFrame()
	if err != nil {
		return fmt.Errorf("reading the server's SETTINGS: %w", err)
	}
	if sf, ok := f.(*http2.SettingsFrame); !ok || sf.IsAck() {
		return fmt.Errorf("first frame from the server is %v, want SETTINGS", f.Header())
	}
	_ = fr.WriteGoAway(0, http2.ErrCodeNo, nil)
	return nil
}
