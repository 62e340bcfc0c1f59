package resolver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/streamlb/streamlb/internal/zkhosts"
)

// Defaults of [ZKOptions].
const (
	// DefaultZKSessionTimeout is the session timeout asked of ZooKeeper
	// (which bounds it between 2 and 20 of its ticks).
	DefaultZKSessionTimeout = 10 * time.Second
	// DefaultZKConnectTimeout bounds the wait for a session before a
	// list.
	DefaultZKConnectTimeout = 5 * time.Second
	// DefaultZKResync is how often a resolver lists its node again
	// without a watch having fired (see ZKOptions.Resync).
	DefaultZKResync = 30 * time.Second
)

// ZKOptions configures [ZK] resolvers, and through [New] (as
// DNSOptions.ZK) every zk target. The zero value means all defaults.
type ZKOptions struct {
	// SessionTimeout is the session timeout asked of ZooKeeper; zero
	// means DefaultZKSessionTimeout.
	SessionTimeout time.Duration
	// ConnectTimeout bounds the wait for a session before each list; zero
	// means DefaultZKConnectTimeout.
	ConnectTimeout time.Duration
	// BackoffInitial is the wait after the first failure; each further
	// consecutive failure doubles it, up to BackoffMax. Zero means
	// DefaultBackoffInitial and DefaultBackoffMax.
	BackoffInitial, BackoffMax time.Duration
	// Resync is how often the resolver lists its node again while no
	// watch fires, without setting a new watch. ZooKeeper delivers a
	// watch only to a session the node's ACL lets read it (since
	// CVE-2024-23944; Debian's 3.8.0 behaves so too), so a node created
	// with such an ACL under a resolver waiting for it, or an ACL changed
	// to shut it out, would otherwise go unseen until a reconnection:
	// the set empty or stale, and no NOAUTH warning. Zero means
	// DefaultZKResync; negative, never.
	Resync time.Duration
	// Username and Password, if set, are added to the session as
	// ZooKeeper's digest credentials ("addauth digest user:password"), so
	// that nodes whose ACL grants READ to that digest identity (a
	// zk.DigestACL) can be listed. ZooKeeper accepts any digest
	// credentials; wrong ones show as NOAUTH on the nodes. Empty means
	// none: only nodes readable by anyone can be listed.
	Username, Password string
	// CAFile is a PEM file of the CAs ZooKeeper's server certificate must
	// chain to; it turns TLS on (ZooKeeper's secureClientPort). CertFile
	// and KeyFile are a PEM client certificate and key presented to it
	// (ssl.clientAuth=need); they turn TLS on too, with the system's CAs
	// if CAFile is empty.
	CAFile, CertFile, KeyFile string
	// Logger receives the resolver's logs, with component=resolver added.
	// Nil means slog.Default().
	Logger *slog.Logger
}

// withDefaults validates o and fills in defaults.
func (o ZKOptions) withDefaults() (ZKOptions, error) {
	var errs []error
	for _, d := range []struct {
		name string
		p    *time.Duration
		def  time.Duration
	}{
		{"SessionTimeout", &o.SessionTimeout, DefaultZKSessionTimeout},
		{"ConnectTimeout", &o.ConnectTimeout, DefaultZKConnectTimeout},
		{"BackoffInitial", &o.BackoffInitial, DefaultBackoffInitial},
		{"BackoffMax", &o.BackoffMax, DefaultBackoffMax},
	} {
		switch {
		case *d.p < 0:
			errs = append(errs, fmt.Errorf("resolver: zk options: negative %s %v", d.name, *d.p))
		case *d.p == 0:
			*d.p = d.def
		}
	}
	if o.Resync == 0 {
		o.Resync = DefaultZKResync
	}
	if o.BackoffInitial > o.BackoffMax {
		errs = append(errs, fmt.Errorf("resolver: zk options: BackoffInitial %v above BackoffMax %v", o.BackoffInitial, o.BackoffMax))
	}
	if (o.Username == "") != (o.Password == "") {
		errs = append(errs, errors.New("resolver: zk options: Username and Password go together"))
	}
	if (o.CertFile == "") != (o.KeyFile == "") {
		errs = append(errs, errors.New("resolver: zk options: CertFile and KeyFile go together"))
	}
	if strings.Contains(o.Username, ":") {
		errs = append(errs, errors.New("resolver: zk options: Username must not contain ':' (digest credentials are user:password)"))
	}
	if len(errs) > 0 {
		return ZKOptions{}, errors.Join(errs...)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o, nil
}

// TLSConfig reads o's TLS files and returns the client TLS configuration
// they make, or nil for cleartext (no CAFile and no CertFile). It is what
// [NewZK] uses, exported for other ZooKeeper clients configured alike (the
// testserver's registration).
func (o ZKOptions) TLSConfig() (*tls.Config, error) {
	return clientTLS("zk", o.CAFile, o.CertFile, o.KeyFile)
}

// ZK is a [Resolver] that follows the children of one ZooKeeper node
// ("zk://host:port[,...]/PATH"), as services register themselves there
// with an ephemeral node each, which goes when their session does. Create
// it with [NewZK] and run it with [ZK.Run].
//
// ZooKeeper's watches fire once, so ZK lists the children with a watch,
// waits for that watch to fire, and lists again, which re-arms it. Each
// child is decoded in its framework's format (see [ZKFormats]) from its
// name and its data, read when the child first appears: a change of a
// child's data is seen at the next full list (after a failure or a session
// expiry), as the frameworks re-create their nodes rather than edit them.
// A child that does not decode is skipped with one warning.
type ZK struct {
	// Immutable after NewZK.
	target Target
	opts   ZKOptions
	tls    *tls.Config // nil: cleartext
	logger *slog.Logger

	// dialer, if set, replaces the client's dialer; for tests.
	dialer zk.Dialer
	// lookupHost, if set, resolves the servers' names instead of
	// net.DefaultResolver (zkhosts.Provider); for tests.
	lookupHost func(ctx context.Context, host string) ([]string, error)
}

var _ Resolver = (*ZK)(nil)

// NewZK validates target, which must be a zk target from [ParseTarget],
// and opts. It does no network I/O and starts no goroutines.
func NewZK(target Target, opts ZKOptions) (*ZK, error) {
	if target.Scheme != SchemeZK || target.Authority == "" || !strings.HasPrefix(target.Host, "/") {
		return nil, fmt.Errorf("resolver: target %q is not a zk target; obtain one from ParseTarget", target)
	}
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	tc, err := opts.TLSConfig()
	if err != nil {
		return nil, err
	}
	return &ZK{
		target: target,
		opts:   opts,
		tls:    tc,
		logger: opts.Logger.With("component", "resolver", "target", target.String()),
	}, nil
}

// Target returns the target z follows.
func (z *ZK) Target() Target { return z.target }

// ResolveNow does nothing: the watch delivers every change as it happens.
func (z *ZK) ResolveNow() {}

// zkNopLogger silences go-zookeeper; Run logs failures itself, once each.
type zkNopLogger struct{}

func (zkNopLogger) Printf(string, ...any) {}

// errZKExpired ends a wait whose session expired: ZooKeeper dropped every
// watch with it, and Run lists again at once on the new session.
var errZKExpired = errors.New("session expired")

// errZKResync is wait's answer when the resync ticker fired.
var errZKResync = errors.New("resync")

// Run connects to ZooKeeper, pushes the children of the node to u and
// follows them until ctx is cancelled; then it closes its session and
// returns nil. It blocks; Run must not be called concurrently with itself.
//
// u.UpdateState is called with the first list and then only when the
// sorted set changes; a node without children, or no node at all, pushes
// an empty set, since that is ZooKeeper's authoritative answer. After a
// session expiry Run lists again at once. On any other failure — a host
// that does not resolve, the connection lost, no session within
// ConnectTimeout, a failed request —
// it keeps the last set, logs a warning, calls u.ReportError, and lists
// again after a backoff of BackoffInitial doubling to BackoffMax. A node
// whose ACL refuses the session (NOAUTH: wrong or missing digest
// credentials) is such a failure; a child it refuses is skipped with a
// warning instead, so that it does not freeze the rest.
func (z *ZK) Run(ctx context.Context, u Updater) error {
	d := &zkDialer{dial: z.dialer, tls: z.tls, errs: &tlsErrors{label: "last connection error"}}
	if d.dial == nil {
		d.dial = net.DialTimeout
	}
	st := &zkState{nodes: make(map[string][]Address), warned: make(map[string]bool)}
	failures := 0
	var conn *zk.Conn
	var events <-chan zk.Event
	for {
		// The servers' names are looked up here, and again each time
		// the client has tried every address without a session (zkhosts;
		// go-zookeeper's own provider looked them up here only): no
		// server that resolves now (a Service not created yet, a DNS
		// failure) is a failure like the others, tried again after the
		// backoff. Returned, it ended this target for good (a Group does
		// not run a resolver again).
		var err error
		conn, events, err = zk.Connect(strings.Split(z.target.Authority, ","), z.opts.SessionTimeout,
			zk.WithDialer(d.Dial), zk.WithHostProvider(zkhosts.New(ctx, z.lookupHost)),
			zk.WithLogger(zkNopLogger{}), zk.WithLogInfo(false))
		if err == nil {
			break
		}
		failures++
		err = fmt.Errorf("resolver: %s: zk client: %w", z.target, err)
		z.logger.Warn("zookeeper failed; keeping last set", "err", err, "backends", len(st.last), "failures", failures)
		u.ReportError(err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff(z.opts.BackoffInitial, z.opts.BackoffMax, failures)):
		}
	}
	defer conn.Close()
	// A request cannot be cancelled; closing the connection fails it.
	stopClose := context.AfterFunc(ctx, conn.Close)
	defer stopClose()

	for {
		watch, err := z.list(ctx, conn, events, st, u)
		if err == nil {
			if failures > 0 {
				z.logger.Info("zookeeper recovered", "failures", failures)
			}
			failures = 0
			d.errs.take() // from before the recovery: not the cause of what follows
			err = z.follow(ctx, conn, events, st, u, watch)
			if err == nil {
				continue // the children changed: list again, re-arming the watch
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		st.stale = true // read every child's data again
		if errors.Is(err, errZKExpired) || errors.Is(err, zk.ErrSessionExpired) {
			z.logger.Info("zookeeper session expired; listing again")
			continue
		}
		failures++
		err = fmt.Errorf("resolver: %s: %w", z.target, d.errs.annotate(err))
		z.logger.Warn("zookeeper failed; keeping last set", "err", err, "backends", len(st.last), "failures", failures)
		u.ReportError(err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff(z.opts.BackoffInitial, z.opts.BackoffMax, failures)):
		}
	}
}

// zkState is what Run knows of the node. It is used by Run's goroutine
// only.
type zkState struct {
	nodes  map[string][]Address // decoded addresses per child name
	warned map[string]bool      // children whose undecodable data was logged
	stale  bool                 // nodes' data must be read again
	authed bool                 // the digest credentials were added
	pushed
}

// awaitSession waits until conn has a session, for at most
// ConnectTimeout.
func (z *ZK) awaitSession(ctx context.Context, conn *zk.Conn, events <-chan zk.Event) error {
	if conn.State() == zk.StateHasSession {
		return nil
	}
	t := time.NewTimer(z.opts.ConnectTimeout)
	defer t.Stop()
	for conn.State() != zk.StateHasSession {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return fmt.Errorf("no session within %v (state %v)", z.opts.ConnectTimeout, conn.State())
		case ev := <-events:
			if ev.State == zk.StateExpired {
				// The list that follows is on the new session.
				z.logger.Info("zookeeper session expired; listing again")
			}
		}
	}
	return nil
}

// list reads the children of the node with a watch, decodes the new ones,
// pushes the set if it changed and returns the watch.
func (z *ZK) list(ctx context.Context, conn *zk.Conn, events <-chan zk.Event, st *zkState, u Updater) (<-chan zk.Event, error) {
	return z.listing(ctx, conn, events, st, u, true)
}

// follow waits for watch, as wait does, and every Resync lists the node
// again without a new watch (listing): the ACL may keep ZooKeeper from
// delivering the watch (ZKOptions.Resync). Run's goroutine only.
func (z *ZK) follow(ctx context.Context, conn *zk.Conn, events <-chan zk.Event, st *zkState, u Updater, watch <-chan zk.Event) error {
	var tick <-chan time.Time
	if z.opts.Resync > 0 {
		t := time.NewTicker(z.opts.Resync)
		defer t.Stop()
		tick = t.C
	}
	for {
		err := z.wait(ctx, events, watch, tick)
		if !errors.Is(err, errZKResync) {
			return err
		}
		again, err := z.listing(ctx, conn, events, st, u, false)
		if err != nil {
			return err
		}
		if again != nil {
			watch = again // the node exists now: list it with a watch
		}
	}
}

// listing is list; unless watched, it sets no watch and returns a nil
// one, but when the node that was missing exists now: then a channel
// with one event, to have it listed with a watch.
func (z *ZK) listing(ctx context.Context, conn *zk.Conn, events <-chan zk.Event, st *zkState, u Updater, watched bool) (<-chan zk.Event, error) {
	if err := z.awaitSession(ctx, conn, events); err != nil {
		return nil, err
	}
	if z.opts.Username != "" && !st.authed {
		// Once per connection object: go-zookeeper sends the credentials
		// it was given again on every reconnection and new session.
		if err := conn.AddAuth("digest", []byte(z.opts.Username+":"+z.opts.Password)); err != nil {
			return nil, fmt.Errorf("add digest credentials of %q: %w", z.opts.Username, err)
		}
		st.authed = true
	}
	p := z.target.Host
	var children []string
	var watch <-chan zk.Event
	var err error
	if watched {
		children, _, watch, err = conn.ChildrenW(p)
	} else {
		children, _, err = conn.Children(p)
	}
	if errors.Is(err, zk.ErrNoNode) {
		// No node is an authoritative empty set; watch for its creation.
		var exists bool
		if watched {
			exists, _, watch, err = conn.ExistsW(p)
		} else {
			exists, _, err = conn.Exists(p)
		}
		if err == nil && exists {
			// Created since: have Run list again at once.
			again := make(chan zk.Event, 1)
			again <- zk.Event{Type: zk.EventNodeCreated, Path: p}
			return again, nil
		}
		children = nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %q: %w", p, z.explain(err))
	}
	nodes := make(map[string][]Address, len(children))
	for _, name := range children {
		if as, ok := st.nodes[name]; ok && !st.stale {
			nodes[name] = as
			continue
		}
		full := path.Join(p, name)
		data, _, err := conn.Get(full)
		if errors.Is(err, zk.ErrNoNode) {
			continue // gone since the list; the watch has fired
		}
		if errors.Is(err, zk.ErrNoAuth) {
			// One node its owner locked away must not freeze the rest:
			// skip it, as a node that does not decode.
			if !st.warned[name] {
				st.warned[name] = true
				z.logger.Warn("skipping zookeeper node: its ACL does not let this session read it", "node", full, "err", z.explain(err))
			}
			if as, ok := st.nodes[name]; ok {
				nodes[name] = as
			}
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("get %q: %w", full, err)
		}
		if as, ok := z.decode(st, full, name, data); ok {
			nodes[name] = as
		}
	}
	st.nodes, st.stale = nodes, false
	for name := range st.warned {
		if _, ok := nodes[name]; !ok && !slices.Contains(children, name) {
			delete(st.warned, name) // gone: warn again if it comes back bad
		}
	}
	z.push(st, u)
	return watch, nil
}

// explain adds to a NOAUTH error what it means here.
func (z *ZK) explain(err error) error {
	if !errors.Is(err, zk.ErrNoAuth) {
		return err
	}
	if z.opts.Username == "" {
		return fmt.Errorf("%w (the ACL requires credentials and none were given)", err)
	}
	return fmt.Errorf("%w (the ACL does not grant READ to digest user %q with this password)", err, z.opts.Username)
}

// decode decodes one child. A child that does not decode is logged once
// and skipped: it keeps its previous addresses, if it had any.
func (z *ZK) decode(st *zkState, full, name string, data []byte) ([]Address, bool) {
	as, format, err := decodeZKNode(full, name, data, z.target.Format)
	if err != nil {
		if !st.warned[name] {
			st.warned[name] = true
			if format == "" {
				format = "auto"
			}
			z.logger.Warn("skipping zookeeper node: does not decode", "node", full, "format", format, "err", err, "data", truncate(string(data), 200))
		}
		prev, ok := st.nodes[name]
		return prev, ok
	}
	delete(st.warned, name)
	return as, true
}

// wait blocks until the watch fires (nil: list again), the session is
// lost or expires (an error), resync ticks (errZKResync), or ctx ends
// (nil).
func (z *ZK) wait(ctx context.Context, events <-chan zk.Event, watch <-chan zk.Event, resync <-chan time.Time) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-resync:
			return errZKResync
		case ev := <-watch:
			if ev.Err != nil {
				if errors.Is(ev.Err, zk.ErrSessionExpired) {
					return errZKExpired
				}
				return fmt.Errorf("watch: %w", ev.Err)
			}
			if ev.Type == zk.EventNotWatching {
				return errors.New("watch dropped")
			}
			return nil
		case ev := <-events:
			switch ev.State {
			case zk.StateExpired:
				return errZKExpired
			case zk.StateDisconnected:
				return errors.New("connection to zookeeper lost")
			case zk.StateAuthFailed:
				return errors.New("zookeeper authentication failed")
			}
		}
	}
}

// push offers the union of st.nodes to u if it differs from the last set u
// accepted.
func (z *ZK) push(st *zkState, u Updater) {
	st.pushSet(z.logger, st.nodes, u)
}
