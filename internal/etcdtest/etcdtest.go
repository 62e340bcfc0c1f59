// Package etcdtest runs an embedded etcd server (go.etcd.io/etcd/server/v3/embed)
// in-process on loopback ports for tests: fast, hermetic, no install. It is
// imported only by tests and imports nothing of streamlb's.
package etcdtest

import (
	"context"
	"net"
	"net/url"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Server is one embedded etcd member. Its ports and data directory stay
// the same across Stop and Start, so a restarted server is the same
// member with the same data, as after an etcd outage.
type Server struct {
	t         testing.TB
	dir       string
	clientURL url.URL
	peerURL   url.URL
	e         *embed.Etcd
	// held keeps the stopped server's ports bound, so that no other test
	// (or package, running at the same time) starts a server on them and
	// answers for this one while it is down; Start lets them go.
	held []net.Listener
}

// Start starts a single-member etcd with its data in t.TempDir() on two
// free loopback ports, and stops it when the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	s := &Server{
		t:         t,
		dir:       t.TempDir(),
		clientURL: url.URL{Scheme: "http", Host: freeAddr(t)},
		peerURL:   url.URL{Scheme: "http", Host: freeAddr(t)},
	}
	s.Start()
	t.Cleanup(func() {
		s.Stop()
		s.release()
	})
	return s
}

// freeAddr returns a loopback address that was free a moment ago.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// Endpoint returns the client address, "127.0.0.1:PORT".
func (s *Server) Endpoint() string { return s.clientURL.Host }

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
	var (
		e   *embed.Etcd
		err error
	)
	// The ports were free when picked, and are again a moment after a
	// Stop; retry briefly in case the kernel has not let go yet.
	deadline := time.Now().Add(5 * time.Second)
	for {
		e, err = embed.StartEtcd(cfg)
		if err == nil || time.Now().After(deadline) {
			break
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
	s.e = e
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

// Client returns a client of the server, closed when the test ends.
func (s *Server) Client() *clientv3.Client {
	s.t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{s.Endpoint()},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { cli.Close() })
	return cli
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
