// Package etcdtest runs an embedded etcd server (go.etcd.io/etcd/server/v3/embed)
// in-process on loopback ports for tests: fast, hermetic, no install. It is
// imported only by tests and imports nothing of streamlb's but
// internal/testkit.
package etcdtest

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/streamlb/streamlb/internal/testkit"
)

// Server is one embedded etcd member. Its ports and data directory stay
// the same across Stop and Start, so a restarted server is the same
// member with the same data, as after an etcd outage.
type Server struct {
	t         testing.TB
	dir       string
	clientURL url.URL
	peerURL   url.URL
	opts      Options
	e         *embed.Etcd
	// held keeps the stopped server's ports bound, so that no other test
	// (or package, running at the same time) starts a server on them and
	// answers for this one while it is down; Start lets them go.
	held []net.Listener
	// served is set once the server first served: its ports are its
	// own from then on, and a restart must keep them.
	served bool
}

// Options configures [StartWith]. The zero value is a cleartext server,
// as [Start] runs.
type Options struct {
	// CertFile and KeyFile are the server's PEM certificate and key for
	// its clients: they turn TLS on (https://); the peer port stays
	// cleartext.
	CertFile, KeyFile string
	// ClientCertAuth makes the server require a client certificate that
	// chains to TrustedCAFile (etcd's --client-cert-auth).
	ClientCertAuth bool
	TrustedCAFile  string
	// ClientTLS is the TLS configuration of the clients made by
	// [Server.Client]; needed when CertFile is set.
	ClientTLS *tls.Config
}

// Start starts a single-member etcd with its data in t.TempDir() on two
// free loopback ports, and stops it when the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	return StartWith(t, Options{})
}

// StartWith is [Start] with TLS settings.
func StartWith(t testing.TB, opts Options) *Server {
	t.Helper()
	scheme := "http"
	if opts.CertFile != "" {
		scheme = "https"
	}
	s := &Server{
		t:         t,
		dir:       t.TempDir(),
		clientURL: url.URL{Scheme: scheme, Host: testkit.FreeAddr(t)},
		peerURL:   url.URL{Scheme: "http", Host: testkit.FreeAddr(t)},
		opts:      opts,
	}
	s.Start()
	t.Cleanup(func() {
		s.Stop()
		s.release()
	})
	return s
}

// Endpoint returns the client address, "127.0.0.1:PORT".
func (s *Server) Endpoint() string { return s.clientURL.Host }

// SetCert makes the next [Server.Start] of a stopped server present
// another certificate, as after a rotation.
func (s *Server) SetCert(certFile, keyFile string) {
	s.opts.CertFile, s.opts.KeyFile = certFile, keyFile
}

// Start (re)starts the server if it is stopped and waits until it serves.
func (s *Server) Start() {
	s.t.Helper()
	if s.e != nil {
		return
	}
	s.release()
	cfg := embed.NewConfig()
	cfg.Name = "etcdtest"
	cfg.Dir = s.dir
	cfg.ListenClientUrls = []url.URL{s.clientURL}
	cfg.AdvertiseClientUrls = []url.URL{s.clientURL}
	cfg.ListenPeerUrls = []url.URL{s.peerURL}
	cfg.AdvertisePeerUrls = []url.URL{s.peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.Logger = "zap"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.UnsafeNoFsync = true
	// bcrypt's minimum cost: a login at the default cost takes over a
	// second under the race detector, longer than the tests' timeouts.
	cfg.BcryptCost = 4
	if s.opts.CertFile != "" {
		cfg.ClientTLSInfo = transport.TLSInfo{
			CertFile:       s.opts.CertFile,
			KeyFile:        s.opts.KeyFile,
			ClientCertAuth: s.opts.ClientCertAuth,
			TrustedCAFile:  s.opts.TrustedCAFile,
		}
	}
	var (
		e   *embed.Etcd
		err error
	)
	// The ports were free when picked, and are again a moment after a
	// Stop; retry briefly in case the kernel has not let go yet. Before
	// the first start, a port taken meanwhile (a busy machine's outgoing
	// connections use the same range) is replaced by a new one.
	deadline := time.Now().Add(5 * time.Second)
	for {
		e, err = embed.StartEtcd(cfg)
		if err == nil || time.Now().After(deadline) {
			break
		}
		if !s.served && strings.Contains(err.Error(), "address already in use") {
			s.clientURL.Host, s.peerURL.Host = testkit.FreeAddr(s.t), testkit.FreeAddr(s.t)
			cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{s.clientURL}, []url.URL{s.clientURL}
			cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{s.peerURL}, []url.URL{s.peerURL}
			cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
			continue
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		s.t.Fatalf("etcdtest: start: %v", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(10 * time.Second):
		e.Close()
		s.t.Fatal("etcdtest: server not ready after 10s")
	}
	s.e, s.served = e, true
}

// Stop stops the server; its data stays for Start.
func (s *Server) Stop() {
	if s.e == nil {
		return
	}
	s.e.Close()
	<-s.e.Server.StopNotify()
	s.e = nil
	// Hold the ports while down: connections to them queue and are never
	// answered, as to a host that is gone, and nobody else can take them.
	for _, host := range []string{s.clientURL.Host, s.peerURL.Host} {
		if ln, err := net.Listen("tcp", host); err == nil {
			s.held = append(s.held, ln)
		}
	}
}

// release lets the held ports go.
func (s *Server) release() {
	for _, ln := range s.held {
		ln.Close()
	}
	s.held = nil
}

// Client returns a client of the server, over TLS with Options.ClientTLS
// if the server has TLS, closed when the test ends.
func (s *Server) Client() *clientv3.Client {
	s.t.Helper()
	return s.ClientAs("", "")
}

// ClientAs is [Server.Client] authenticated as user (etcd's auth).
func (s *Server) ClientAs(user, password string) *clientv3.Client {
	s.t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{s.Endpoint()},
		DialTimeout: 5 * time.Second,
		TLS:         s.opts.ClientTLS,
		Username:    user,
		Password:    password,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { cli.Close() })
	return cli
}

// EnableAuth turns etcd's authentication on through cli (a client made
// before, so unauthenticated), as an operator does with etcdctl: user root
// with rootPassword and the root role, and user with password and a role
// that may only read the keys under prefix. From then on writes need a
// client of [Server.ClientAs] root.
func EnableAuth(t testing.TB, cli *clientv3.Client, rootPassword, user, password, prefix string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	steps := []struct {
		what string
		do   func() error
	}{
		{"add user root", func() error { _, err := cli.UserAdd(ctx, "root", rootPassword); return err }},
		{"add role root", func() error {
			_, err := cli.RoleAdd(ctx, "root")
			if errors.Is(err, rpctypes.ErrRoleAlreadyExist) {
				return nil // built in on some versions
			}
			return err
		}},
		{"grant root", func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err }},
		{"add role reader", func() error { _, err := cli.RoleAdd(ctx, "reader"); return err }},
		{"grant read", func() error {
			_, err := cli.RoleGrantPermission(ctx, "reader", prefix, clientv3.GetPrefixRangeEnd(prefix), clientv3.PermissionType(clientv3.PermRead))
			return err
		}},
		{"add user " + user, func() error { _, err := cli.UserAdd(ctx, user, password); return err }},
		{"grant reader", func() error { _, err := cli.UserGrantRole(ctx, user, "reader"); return err }},
		{"enable auth", func() error { _, err := cli.AuthEnable(ctx); return err }},
	}
	for _, st := range steps {
		if err := st.do(); err != nil {
			t.Fatalf("etcdtest: %s: %v", st.what, err)
		}
	}
}

// Put writes key=value, failing the test on error.
func (s *Server) Put(cli *clientv3.Client, key, value string, opts ...clientv3.OpOption) *clientv3.PutResponse {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Put(ctx, key, value, opts...)
	if err != nil {
		s.t.Fatalf("etcdtest: put %q: %v", key, err)
	}
	return resp
}
