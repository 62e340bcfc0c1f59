package testserver

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/streamlb/streamlb/internal/zkhosts"
)

// zkKitexData is the data kitex-contrib/registry-zookeeper writes on an
// instance's node.
type zkKitexData struct {
	Weight int               `json:"Weight"`
	Tags   map[string]string `json:"Tags"`
}

// zkNopLogger silences go-zookeeper.
type zkNopLogger struct{}

func (zkNopLogger) Printf(string, ...any) {}

// RegisterZK registers addr ("host:port") in the ZooKeeper of target
// ("zk://host:port[,host:port...]/PATH"), the way a Kitex service does: an
// ephemeral node PATH/addr with data {"Weight":...,"Tags":{...}}, held by a
// session of timeout opts.TTL that the client keeps alive. Missing parents
// of the node are created as persistent nodes. It returns once the node is
// written. The caller must end the registration with Deregister (the
// session is closed and the node goes at once) or Abandon (the connection
// is dropped and the node goes when the session expires; Abandon takes
// about a second, the client's wait for a reply that cannot come).
func RegisterZK(ctx context.Context, target, addr string, opts RegisterOptions) (*Registration, error) {
	servers, nodePath, err := splitZKTarget(target)
	if err != nil {
		return nil, err
	}
	if opts.TTL == 0 {
		opts.TTL = DefaultRegisterTTL
	}
	if (opts.Username == "") != (opts.Password == "") || strings.Contains(opts.Username, ":") {
		return nil, errors.New("testserver: register: ZooKeeper digest credentials need a username without ':' and a password")
	}
	acl := zk.WorldACL(zk.PermAll)
	if opts.Username != "" {
		acl = zk.DigestACL(zk.PermAll, opts.Username, opts.Password)
	}
	weight := opts.Weight
	if weight == 0 {
		weight = 10
	}
	if opts.Tags == nil {
		opts.Tags = map[string]string{}
	}
	data, err := json.Marshal(zkKitexData{Weight: weight, Tags: opts.Tags})
	if err != nil {
		return nil, fmt.Errorf("testserver: register: %w", err)
	}

	// A dialer that can be cut for good, so that Abandon can leave the
	// session to expire as a killed process would.
	var (
		mu   sync.Mutex
		dead bool
		nc   net.Conn
	)
	dial := func(network, address string, timeout time.Duration) (net.Conn, error) {
		mu.Lock()
		defer mu.Unlock()
		if dead {
			return nil, net.ErrClosed
		}
		c, err := net.DialTimeout(network, address, timeout)
		if err != nil {
			return nil, err
		}
		if opts.TLS != nil {
			cfg := opts.TLS.Clone()
			if cfg.ServerName == "" {
				cfg.ServerName, _, _ = net.SplitHostPort(address)
			}
			tc := tls.Client(c, cfg)
			_ = tc.SetDeadline(time.Now().Add(timeout))
			if err := tc.Handshake(); err != nil {
				c.Close()
				return nil, err
			}
			_ = tc.SetDeadline(time.Time{})
			c = tc
		}
		nc = c
		return c, nil
	}
	// The servers' names are looked up again when the addresses known
	// fail, as the resolver's client does (zkhosts.Provider):
	// go-zookeeper's own provider looked them up once, and a ZooKeeper
	// server that moved to another address was never found again, so the
	// session expired and the registration went with it. Lookups end
	// with the registration.
	hostsCtx, stopLookups := context.WithCancel(context.Background())
	registered := false
	defer func() {
		if !registered {
			stopLookups()
		}
	}()
	conn, events, err := zk.Connect(servers, opts.TTL, zk.WithDialer(dial),
		zk.WithHostProvider(zkhosts.New(hostsCtx, opts.lookupHost)),
		zk.WithLogger(zkNopLogger{}), zk.WithLogInfo(false))
	if err != nil {
		return nil, fmt.Errorf("testserver: register: zk client: %w", err)
	}
	if err := awaitZKSession(ctx, conn, events); err != nil {
		conn.Close()
		return nil, fmt.Errorf("testserver: register: %w", err)
	}
	if opts.Username != "" {
		if err := conn.AddAuth("digest", []byte(opts.Username+":"+opts.Password)); err != nil {
			conn.Close()
			return nil, fmt.Errorf("testserver: register: add digest credentials: %w", err)
		}
	}
	key := strings.TrimRight(nodePath, "/") + "/" + addr
	if err := createZKParents(conn, key, acl); err != nil {
		conn.Close()
		return nil, fmt.Errorf("testserver: register %s: %w", key, err)
	}
	if _, err := conn.Create(key, data, zk.FlagEphemeral, acl); err != nil {
		conn.Close()
		return nil, fmt.Errorf("testserver: register %s: %w", key, err)
	}
	registered = true
	return &Registration{
		key: key,
		deregister: func(context.Context) error {
			conn.Close() // closeSession: ZooKeeper deletes the ephemeral node
			stopLookups()
			return nil
		},
		abandon: func() {
			mu.Lock()
			dead = true
			if nc != nil {
				nc.Close()
			}
			mu.Unlock()
			conn.Close() // no server to tell: stops the client's goroutines
			stopLookups()
		},
	}, nil
}

// awaitZKSession waits until conn has a session or ctx ends.
func awaitZKSession(ctx context.Context, conn *zk.Conn, events <-chan zk.Event) error {
	for conn.State() != zk.StateHasSession {
		select {
		case <-ctx.Done():
			return fmt.Errorf("no zookeeper session: %w", ctx.Err())
		case <-events:
		}
	}
	return nil
}

// createZKParents creates the missing parents of p as persistent nodes
// with acl.
func createZKParents(conn *zk.Conn, p string, acl []zk.ACL) error {
	parts := strings.Split(strings.Trim(p, "/"), "/")
	for i := 1; i < len(parts); i++ {
		parent := "/" + strings.Join(parts[:i], "/")
		if _, err := conn.Create(parent, nil, 0, acl); err != nil && !errors.Is(err, zk.ErrNodeExists) {
			return fmt.Errorf("create %s: %w", parent, err)
		}
	}
	return nil
}

// splitZKTarget splits "zk://h:p[,h:p...]/PATH[?query]" into the servers
// and the node path with one leading '/'.
func splitZKTarget(target string) ([]string, string, error) {
	usage := fmt.Errorf("testserver: register target %q: want zk://HOST:PORT[,...]/PATH", target)
	rest, ok := strings.CutPrefix(target, "zk://")
	if !ok {
		return nil, "", usage
	}
	rest, _, _ = strings.Cut(rest, "?")
	authority, p, ok := strings.Cut(rest, "/")
	p = strings.Trim(p, "/")
	if !ok || authority == "" || p == "" || strings.Contains(p, "//") {
		return nil, "", usage
	}
	return strings.Split(authority, ","), "/" + p, nil
}
