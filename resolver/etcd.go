package resolver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// Defaults of [EtcdOptions].
const (
	// DefaultEtcdRequestTimeout bounds one Get, the list and the probes.
	DefaultEtcdRequestTimeout = 5 * time.Second
	// DefaultEtcdProbeInterval is how often a watching resolver checks
	// that etcd still answers. A watch on a server that went away does
	// not fail: etcd's client reconnects it silently, so without a probe
	// the set would freeze without anyone being told.
	DefaultEtcdProbeInterval = 5 * time.Second
	// DefaultEtcdMaxResponseBytes bounds one response from etcd: a list of
	// the prefix, or a watch response. etcd's client takes up to 2 GiB by
	// default, and a list holds every value under the prefix at once: a
	// registry of 10,000 endpoints (MaxAddresses) in values of a few
	// hundred bytes is a few MiB, while keys of etcd's largest value (1.5
	// MiB by default) under the prefix would have the proxy hold them all.
	DefaultEtcdMaxResponseBytes = 64 << 20
)

// EtcdOptions configures [Etcd] resolvers, and through [New] (as
// DNSOptions.Etcd) every etcd target. The zero value means all defaults:
// cleartext, no authentication.
type EtcdOptions struct {
	// CAFile is a PEM file of the CAs etcd's server certificate must chain
	// to; it turns TLS on. CertFile and KeyFile are a PEM client
	// certificate and key presented to etcd (they turn TLS on too, with
	// the system's CAs if CAFile is empty).
	CAFile, CertFile, KeyFile string
	// Username and Password authenticate to etcd (etcd's auth); empty
	// means none.
	Username, Password string
	// RequestTimeout bounds each request: the list and the probes. Zero
	// means DefaultEtcdRequestTimeout.
	RequestTimeout time.Duration
	// ProbeInterval is how often a watching resolver checks that etcd
	// still answers; zero means DefaultEtcdProbeInterval.
	ProbeInterval time.Duration
	// BackoffInitial is the wait after the first failure; each further
	// consecutive failure doubles it, up to BackoffMax. Zero means
	// DefaultBackoffInitial and DefaultBackoffMax.
	BackoffInitial, BackoffMax time.Duration
	// MaxResponseBytes bounds one response from etcd (a list, a watch
	// response); a list over it fails, and the last set is kept. Zero
	// means DefaultEtcdMaxResponseBytes.
	MaxResponseBytes int
	// Logger receives the resolver's logs, with component=resolver added.
	// Nil means slog.Default().
	Logger *slog.Logger
}

// withDefaults validates o and fills in defaults.
func (o EtcdOptions) withDefaults() (EtcdOptions, error) {
	var errs []error
	for _, d := range []struct {
		name string
		p    *time.Duration
		def  time.Duration
	}{
		{"RequestTimeout", &o.RequestTimeout, DefaultEtcdRequestTimeout},
		{"ProbeInterval", &o.ProbeInterval, DefaultEtcdProbeInterval},
		{"BackoffInitial", &o.BackoffInitial, DefaultBackoffInitial},
		{"BackoffMax", &o.BackoffMax, DefaultBackoffMax},
	} {
		switch {
		case *d.p < 0:
			errs = append(errs, fmt.Errorf("resolver: etcd options: negative %s %v", d.name, *d.p))
		case *d.p == 0:
			*d.p = d.def
		}
	}
	if o.BackoffInitial > o.BackoffMax {
		errs = append(errs, fmt.Errorf("resolver: etcd options: BackoffInitial %v above BackoffMax %v", o.BackoffInitial, o.BackoffMax))
	}
	switch {
	case o.MaxResponseBytes < 0:
		errs = append(errs, fmt.Errorf("resolver: etcd options: negative MaxResponseBytes %d", o.MaxResponseBytes))
	case o.MaxResponseBytes == 0:
		o.MaxResponseBytes = DefaultEtcdMaxResponseBytes
	}
	if (o.CertFile == "") != (o.KeyFile == "") {
		errs = append(errs, errors.New("resolver: etcd options: CertFile and KeyFile go together"))
	}
	if (o.Username == "") != (o.Password == "") {
		errs = append(errs, errors.New("resolver: etcd options: Username and Password go together"))
	}
	if len(errs) > 0 {
		return EtcdOptions{}, errors.Join(errs...)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o, nil
}

// TLSConfig reads o's TLS files and returns the client TLS configuration
// they make, or nil for cleartext (no CAFile and no CertFile). It is what
// [NewEtcd] uses, exported for other etcd clients configured alike (the
// testserver's registration).
func (o EtcdOptions) TLSConfig() (*tls.Config, error) {
	return clientTLS("etcd", o.CAFile, o.CertFile, o.KeyFile)
}

// Etcd is a [Resolver] that follows the keys under one prefix of etcd
// ("etcd://host:port[,...]/PREFIX"), as services register themselves
// there with a lease and a keep-alive. Create it with [NewEtcd] and run it
// with [Etcd.Run].
//
// It lists the keys under PREFIX+"/" and then watches them from the
// list's revision on, so no change between the two is missed, with
// require-leader so that a member cut off from its cluster ends the watch
// instead of serving a stale view. Each key's value is decoded in its
// framework's format (see [EtcdFormats]); a value that does not decode is
// skipped with one warning per key, and the key keeps what it registered
// before, if anything.
type Etcd struct {
	// Immutable after NewEtcd.
	target Target
	prefix string // target.Host + "/"
	opts   EtcdOptions
	tls    *tls.Config
	logger *slog.Logger

	// afterList, if set, is called on Run's goroutine after each
	// successful list, before the watch starts; for tests.
	afterList func()
}

var _ Resolver = (*Etcd)(nil)

// errCompacted ends a watch whose start revision was compacted away: the
// resolver lists again at once.
var errCompacted = errors.New("watch revision compacted")

// NewEtcd validates target, which must be an etcd target from
// [ParseTarget], and opts, and reads opts' TLS files. It does no network
// I/O and starts no goroutines.
func NewEtcd(target Target, opts EtcdOptions) (*Etcd, error) {
	if target.Scheme != SchemeEtcd || target.Authority == "" || target.Host == "" {
		return nil, fmt.Errorf("resolver: target %q is not an etcd target; obtain one from ParseTarget", target)
	}
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	tc, err := opts.TLSConfig()
	if err != nil {
		return nil, err
	}
	return &Etcd{
		target: target,
		prefix: target.Host + "/",
		opts:   opts,
		tls:    tc,
		logger: opts.Logger.With("component", "resolver", "target", target.String()),
	}, nil
}

// Target returns the target e follows.
func (e *Etcd) Target() Target { return e.target }

// ResolveNow does nothing: the watch delivers every change as it happens,
// and a backend refusing connections says nothing new about etcd.
func (e *Etcd) ResolveNow() {}

// Run connects to etcd, pushes the set under the prefix to u and follows
// it until ctx is cancelled; then it closes its client and returns nil.
// It blocks; Run must not be called concurrently with itself.
//
// u.UpdateState is called with the first list and then only when the
// sorted set changes; a list that finds no key pushes an empty set, since
// that is etcd's authoritative answer. On compaction of the watched
// revision Run lists again at once. On any other failure — etcd
// unreachable (found by a probe every ProbeInterval, because the client
// retries a broken watch silently), no leader, a failed list, a TLS
// handshake or a login that fails — it keeps the last set, logs a warning,
// calls u.ReportError, and tries again after a backoff of BackoffInitial
// doubling to BackoffMax. A TLS failure is named in the error (etcd's
// client alone would say only "context deadline exceeded"), and so is a
// wrong password: etcd's "authentication failed".
func (e *Etcd) Run(ctx context.Context, u Updater) error {
	cfg := clientv3.Config{
		Endpoints:   strings.Split(e.target.Authority, ","),
		DialTimeout: e.opts.RequestTimeout,
		TLS:         e.tls,
		Username:    e.opts.Username,
		Password:    e.opts.Password,
		Logger:      zap.NewNop(), // failures are logged here, once each
		Context:     ctx,
		// What one response may make the proxy hold (etcd's own
		// default is 2 GiB).
		MaxCallRecvMsgSize: e.opts.MaxResponseBytes,
	}
	var tlsErrs *tlsErrors // nil for cleartext
	if e.tls != nil {
		// Replaces the client's own TLS credentials (its DialOptions come
		// last), with the same configuration, to learn why a connection
		// failed.
		tlsErrs = &tlsErrors{label: "last TLS error"}
		cfg.DialOptions = []grpc.DialOption{grpc.WithTransportCredentials(newRecordingCreds(e.tls, tlsErrs))}
	}
	var cli *clientv3.Client
	defer func() {
		if cli != nil {
			cli.Close()
		}
	}()

	st := &etcdState{keys: make(map[string][]Address), warned: make(map[string]bool)}
	failures := 0
	for {
		var (
			rev int64
			err error
		)
		if cli == nil {
			// With a username, New logs in at once, so a wrong password
			// or an etcd that is down fails here: like any failure, it is
			// retried after a backoff, never fatal.
			if cli, err = clientv3.New(cfg); err != nil {
				cli, err = nil, fmt.Errorf("connect: %w", err)
			}
		}
		if err == nil {
			rev, err = e.list(ctx, cli, st, u)
		}
		if err == nil {
			if failures > 0 {
				e.logger.Info("etcd recovered", "failures", failures)
			}
			failures = 0
			if tlsErrs != nil {
				tlsErrs.take() // from before the recovery: not the cause of what follows
			}
			if e.afterList != nil {
				e.afterList()
			}
			err = e.watch(ctx, cli, st, u, rev)
		}
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, errCompacted) {
			e.logger.Info("watch revision compacted; listing again", "revision", rev+1)
			continue
		}
		failures++
		err = fmt.Errorf("resolver: %s: %w", e.target, tlsErrs.annotate(err))
		e.logger.Warn("etcd failed; keeping last set", "err", err, "backends", len(st.last), "failures", failures)
		u.ReportError(err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff(e.opts.BackoffInitial, e.opts.BackoffMax, failures)):
		}
	}
}

// etcdState is what Run knows of the prefix. It is used by Run's goroutine
// only.
type etcdState struct {
	keys   map[string][]Address // decoded addresses per key
	warned map[string]bool      // keys whose undecodable value was logged
	pushed
}

// list reads every key under the prefix, replaces st.keys with them,
// pushes the set if it changed, and returns the revision of the read.
func (e *Etcd) list(ctx context.Context, cli *clientv3.Client, st *etcdState, u Updater) (int64, error) {
	rctx, cancel := context.WithTimeout(ctx, e.opts.RequestTimeout)
	defer cancel()
	resp, err := cli.Get(rctx, e.prefix, clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("list %q: %w", e.prefix, err)
	}
	keys := make(map[string][]Address, len(resp.Kvs))
	present := make(map[string]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		present[k] = true
		if as, ok := e.decode(st, k, kv.Value); ok {
			keys[k] = as
		}
	}
	st.keys = keys
	for k := range st.warned {
		if !present[k] {
			delete(st.warned, k) // gone: warn again if it comes back bad
		}
	}
	e.push(st, u)
	return resp.Header.Revision, nil
}

// decode decodes one key's value. A value that does not decode is logged
// once per key and skipped: the key keeps its previous addresses, if it
// had any, so a bad write never takes a backend away.
func (e *Etcd) decode(st *etcdState, key string, value []byte) ([]Address, bool) {
	as, format, err := decodeEtcdValue(key, value, e.target.Format)
	if err != nil {
		if !st.warned[key] {
			st.warned[key] = true
			if format == "" {
				format = "auto"
			}
			e.logger.Warn("skipping etcd key: value does not decode", "key", key, "format", format, "err", err, "value", truncate(string(value), 200))
		}
		prev, ok := st.keys[key]
		return prev, ok
	}
	delete(st.warned, key)
	return as, true
}

// watch follows the prefix from rev+1 until the watch fails, etcd stops
// answering the probe, or ctx ends.
func (e *Etcd) watch(ctx context.Context, cli *clientv3.Client, st *etcdState, u Updater, rev int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	// cli.Watch blocks until its request is sent, which is forever while
	// etcd is unreachable: start it on its own goroutine so that the probe
	// below still notices the outage. Cancelling wctx ends that call.
	started := make(chan clientv3.WatchChan, 1)
	go func() { started <- cli.Watch(wctx, e.prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1)) }()
	var wch clientv3.WatchChan // nil, so not selected, until the watch has started
	defer func() {
		cancel()
		if started != nil {
			<-started
		}
	}()
	probe := time.NewTicker(e.opts.ProbeInterval)
	defer probe.Stop()
	for {
		select {
		case wch = <-started:
			started = nil
		case <-ctx.Done():
			return nil
		case <-probe.C:
			pctx, pcancel := context.WithTimeout(ctx, e.opts.RequestTimeout)
			_, err := cli.Get(pctx, e.prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
			pcancel()
			if err != nil {
				return fmt.Errorf("probe: %w", err)
			}
		case resp, ok := <-wch:
			if err := e.apply(st, resp, ok); err != nil {
				return err
			}
			// Apply the responses already waiting too, then push once: a
			// burst of registrations (a fleet starting, keys flapping)
			// arrives as one response per write, and a push per response
			// rebuilt the whole set each time (3,000 keys, 3,001 pushes).
			for more := true; more; {
				select {
				case resp, ok := <-wch:
					if err := e.apply(st, resp, ok); err != nil {
						return err
					}
				default:
					more = false
				}
			}
			e.push(st, u)
		}
	}
}

// apply applies one watch response (ok false: the channel was closed) to
// st.keys, or returns why the watch ended.
func (e *Etcd) apply(st *etcdState, resp clientv3.WatchResponse, ok bool) error {
	if !ok {
		return errors.New("watch closed")
	}
	if resp.CompactRevision != 0 {
		return errCompacted
	}
	if err := resp.Err(); err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	if resp.Canceled {
		return errors.New("watch cancelled by the server")
	}
	for _, ev := range resp.Events {
		k := string(ev.Kv.Key)
		if ev.Type == clientv3.EventTypeDelete {
			delete(st.keys, k)
			delete(st.warned, k)
			continue
		}
		if as, ok := e.decode(st, k, ev.Kv.Value); ok {
			st.keys[k] = as
		}
	}
	return nil
}

// push offers the union of st.keys to u if it differs from the last set u
// accepted.
func (e *Etcd) push(st *etcdState, u Updater) {
	st.pushSet(e.logger, st.keys, u)
}

// pushed is what a registry resolver pushed: the last set its Updater
// accepted, and whether the registrations are over MaxAddresses (reported
// once until they fit again).
type pushed struct {
	last      []Address
	haveLast  bool
	overLimit bool
}

// pushSet offers the union of the registrations in byKey, in key order and
// without duplicates, to u if it differs from p.last, and records it there
// once u accepts it. It is shared by the registry resolvers.
//
// Registrations that add up to more than MaxAddresses addresses (one
// Kratos or go-micro value may list tens of thousands of endpoints) are
// not pushed: the last set is kept, as on any failure, and the first push
// over the limit is logged and reported to u.
func (p *pushed) pushSet(logger *slog.Logger, byKey map[string][]Address, u Updater) {
	keys := make([]string, 0, len(byKey))
	n := 0
	for k, as := range byKey {
		keys = append(keys, k)
		n += len(as)
	}
	if n > MaxAddresses {
		if !p.overLimit {
			p.overLimit = true
			err := fmt.Errorf("resolver: %d registrations give %d addresses, over the limit of %d; keeping the last set", len(byKey), n, MaxAddresses)
			logger.Warn("registrations over the limit; keeping last set", "err", err, "backends", len(p.last))
			u.ReportError(err)
		}
		return
	}
	if p.overLimit {
		p.overLimit = false
		logger.Info("registrations back within the limit", "addresses", n, "limit", MaxAddresses)
	}
	sort.Strings(keys)
	set := []Address{}
	for _, k := range keys {
		set = append(set, byKey[k]...)
	}
	set = dedupAddresses(set)
	if p.haveLast && slices.Equal(set, p.last) {
		return
	}
	if err := u.UpdateState(State{Addresses: slices.Clone(set)}); err != nil {
		logger.Warn("backend set rejected", "err", err, "backends", len(set))
		return
	}
	if logger.Enabled(context.Background(), slog.LevelDebug) {
		added, removed := diffAddresses(p.last, set)
		logger.Debug("backend set changed", "added", added, "removed", removed, "backends", len(set))
	}
	p.last, p.haveLast = set, true
}

// backoff returns the wait after the given number of consecutive failures
// (at least 1): initial doubled per further failure, capped at maxWait.
func backoff(initial, maxWait time.Duration, failures int) time.Duration {
	b := initial
	for i := 1; i < failures && b < maxWait; i++ {
		b *= 2
	}
	return min(b, maxWait)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
