package testserver

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// DefaultRegisterTTL is the lease TTL of [RegisterEtcd], and the session
// timeout of [RegisterZK], when none is given.
const DefaultRegisterTTL = 10 * time.Second

// RegisterOptions configures [Register], [RegisterEtcd] and [RegisterZK].
type RegisterOptions struct {
	// TTL is the lease's time to live in etcd, or the session timeout in
	// ZooKeeper: how long the registration outlives a crashed backend.
	// Zero means DefaultRegisterTTL; etcd's minimum is about 2s, and
	// ZooKeeper bounds it between 2 and 20 of its ticks.
	TTL time.Duration
	// Weight is the Kitex weight registered; 0 means Kitex's default, 10.
	Weight int
	// Tags are Kitex's tags; nil registers an empty object.
	Tags map[string]string
	// TLS, if set, is the client TLS configuration (server CA, client
	// certificate) for etcd, or for ZooKeeper's TLS port.
	TLS *tls.Config
	// Username and Password, if set, are etcd's login, or ZooKeeper's
	// digest credentials: then the session adds "digest user:password"
	// and the nodes it creates (missing parents too) get a digest ACL
	// granting that user everything and nobody else anything, as a
	// registry that only its services may read.
	Username, Password string

	// lookupHost, if set, resolves ZooKeeper servers' names instead of
	// net.DefaultResolver (zkhosts.Provider); for tests.
	lookupHost func(ctx context.Context, host string) ([]string, error)
}

// Registration is one backend registered by [Register], kept alive until
// [Registration.Deregister] or [Registration.Abandon].
type Registration struct {
	key        string
	deregister func(context.Context) error // graceful: the key goes at once
	abandon    func()                      // as if killed: the key goes with the lease or session
	once       sync.Once
}

// Register registers addr in the registry of target: etcd
// ("etcd://...", see [RegisterEtcd]) or ZooKeeper ("zk://...", see
// [RegisterZK]).
func Register(ctx context.Context, target, addr string, opts RegisterOptions) (*Registration, error) {
	if strings.HasPrefix(target, "zk://") {
		return RegisterZK(ctx, target, addr, opts)
	}
	return RegisterEtcd(ctx, target, addr, opts)
}

// kitexValue is the value kitex-contrib/registry-etcd writes.
type kitexValue struct {
	Network string            `json:"network"`
	Address string            `json:"address"`
	Weight  int               `json:"weight"`
	Tags    map[string]string `json:"tags"`
}

// RegisterEtcd registers addr ("host:port") in the etcd of target
// ("etcd://host:port[,host:port...]/PREFIX"), the way a Kitex service does:
// key PREFIX/addr, value {"network":"tcp","address":addr,"weight":...,
// "tags":{...}}, attached to a lease of opts.TTL kept alive in the
// background. It returns once the key is written. The caller must end the
// registration with Deregister (graceful shutdown: the key goes at once)
// or Abandon (as if the process died: the key goes when the lease
// expires).
func RegisterEtcd(ctx context.Context, target, addr string, opts RegisterOptions) (*Registration, error) {
	endpoints, prefix, err := splitEtcdTarget(target)
	if err != nil {
		return nil, err
	}
	if opts.TTL == 0 {
		opts.TTL = DefaultRegisterTTL
	}
	if opts.TTL < time.Second {
		return nil, fmt.Errorf("testserver: register: TTL %v below 1s", opts.TTL)
	}
	if opts.Tags == nil {
		opts.Tags = map[string]string{}
	}
	weight := opts.Weight
	if weight == 0 {
		weight = 10
	}
	value, err := json.Marshal(kitexValue{Network: "tcp", Address: addr, Weight: weight, Tags: opts.Tags})
	if err != nil {
		return nil, fmt.Errorf("testserver: register: %w", err)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop(),
		TLS: opts.TLS, Username: opts.Username, Password: opts.Password,
	})
	if err != nil {
		return nil, fmt.Errorf("testserver: register: etcd client: %w", err)
	}
	lease, err := cli.Grant(ctx, int64((opts.TTL+time.Second-1)/time.Second))
	if err != nil {
		cli.Close()
		return nil, fmt.Errorf("testserver: register: grant lease: %w", err)
	}
	key := prefix + "/" + addr
	if _, err := cli.Put(ctx, key, string(value), clientv3.WithLease(lease.ID)); err != nil {
		cli.Close()
		return nil, fmt.Errorf("testserver: register %s: %w", key, err)
	}
	kctx, cancel := context.WithCancel(context.Background())
	ka, err := cli.KeepAlive(kctx, lease.ID)
	if err != nil {
		cancel()
		cli.Close()
		return nil, fmt.Errorf("testserver: register: keep-alive: %w", err)
	}
	done := make(chan struct{})
	go keepAliveLoop(ka, done)
	stop := func() {
		cancel()
		<-done
	}
	return &Registration{
		key: key,
		deregister: func(ctx context.Context) error {
			stop()
			defer cli.Close()
			if _, err := cli.Revoke(ctx, lease.ID); err != nil {
				return fmt.Errorf("testserver: deregister %s: %w", key, err)
			}
			return nil
		},
		abandon: func() {
			stop()
			cli.Close()
		},
	}, nil
}

// keepAliveLoop drains the keep-alive responses until the keep-alive
// ends, then closes done; clientv3 needs them read.
func keepAliveLoop(ka <-chan *clientv3.LeaseKeepAliveResponse, done chan<- struct{}) {
	defer close(done)
	for range ka {
	}
}

// Key returns the registered key.
func (r *Registration) Key() string { return r.key }

// Deregister removes the registration at once — etcd: revokes the lease;
// ZooKeeper: closes the session, which deletes its ephemeral node — and
// closes the client. It is what a service does on graceful shutdown.
// Later calls of Deregister and Abandon do nothing.
func (r *Registration) Deregister(ctx context.Context) error {
	var err error
	r.once.Do(func() { err = r.deregister(ctx) })
	return err
}

// Abandon stops keeping the registration alive and drops the client
// without telling the registry, as a killed process would: the key stays
// until the lease or session expires. Later calls of Deregister and
// Abandon do nothing.
func (r *Registration) Abandon() {
	r.once.Do(r.abandon)
}

// splitEtcdTarget splits "etcd://h:p[,h:p...]/PREFIX[?query]" into the
// endpoints and the prefix without trailing '/'. (The resolver package
// parses targets fully; testserver imports nothing of streamlb's.)
func splitEtcdTarget(target string) ([]string, string, error) {
	rest, ok := strings.CutPrefix(target, "etcd://")
	if !ok {
		return nil, "", fmt.Errorf("testserver: register target %q: want etcd://HOST:PORT[,...]/PREFIX", target)
	}
	rest, _, _ = strings.Cut(rest, "?")
	authority, prefix, ok := strings.Cut(rest, "/")
	prefix = strings.TrimRight(prefix, "/")
	if !ok || authority == "" || prefix == "" {
		return nil, "", errors.New("testserver: register target " + fmt.Sprintf("%q", target) + ": want etcd://HOST:PORT[,...]/PREFIX")
	}
	return strings.Split(authority, ","), prefix, nil
}
