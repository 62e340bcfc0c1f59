package demo

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/streamlb/streamlb/testserver"
)

// Registries Config.Registry may name.
const (
	// RegistryDNS publishes the pods as A records of a headless service's
	// name on an embedded DNS server; streamlb re-resolves it.
	RegistryDNS = "dns"
	// RegistryEtcd has the pods register themselves in an embedded etcd,
	// in Kitex's format with a lease kept alive; streamlb watches it.
	RegistryEtcd = "etcd"
)

// etcdService is the Kitex service name the pods register under.
const etcdService = "grpc-echo"

// publisher tells streamlb which pods make up the service. It is used by
// Run's goroutine only.
type publisher interface {
	// target is streamlb's backend target.
	target() string
	// describe says, for the first output line, where the pods are
	// published and how streamlb follows them.
	describe(refresh time.Duration) string
	// publish makes addrs the published set.
	publish(ctx context.Context, addrs []string) error
	// kill drops addr from the set as a killed pod would: without telling
	// the registry. It reports how long the registry takes to notice.
	kill(addr string) time.Duration
	// close stops the publisher and what it started.
	close()
}

// dnsPublisher publishes pods as A records.
type dnsPublisher struct {
	dns  *testserver.DNSServer
	port int
}

func newDNSPublisher(logger *slog.Logger) (*dnsPublisher, error) {
	dns := testserver.NewDNSServer(testserver.DNSConfig{DefaultTTL: 1, Logger: logger})
	if err := dns.Start("127.0.0.1:0"); err != nil {
		return nil, fmt.Errorf("demo: demo DNS server: %w", err)
	}
	return &dnsPublisher{dns: dns}, nil
}

func (p *dnsPublisher) target() string {
	return fmt.Sprintf("dns://%s/%s:%d", p.dns.Addr(), DefaultName, p.port)
}

func (p *dnsPublisher) describe(refresh time.Duration) string {
	return fmt.Sprintf("headless service %s:%d answered by DNS at %s; streamlb re-resolves it every %v", DefaultName, p.port, p.dns.Addr(), refresh)
}

func (p *dnsPublisher) publish(_ context.Context, addrs []string) error {
	ips := make([]string, len(addrs))
	for i, a := range addrs {
		host, port, err := net.SplitHostPort(a)
		if err != nil {
			return err
		}
		ips[i] = host
		fmt.Sscan(port, &p.port) // all pods share one port
	}
	p.dns.SetA(DefaultName, ips...)
	return nil
}

func (p *dnsPublisher) kill(string) time.Duration { return 0 }

func (p *dnsPublisher) close() { p.dns.Stop() }

// etcdPublisher runs an embedded etcd in which each pod registers itself
// as a Kitex service does: key kitex/registry-etcd/<service>/<addr> on a
// lease of ttl kept alive.
type etcdPublisher struct {
	e        *embed.Etcd
	dir      string
	endpoint string
	ttl      time.Duration
	regs     map[string]*testserver.Registration
}

func newEtcdPublisher(ttl time.Duration) (*etcdPublisher, error) {
	dir, err := os.MkdirTemp("", "streamlb-demo-etcd-")
	if err != nil {
		return nil, fmt.Errorf("demo: etcd: %w", err)
	}
	client, peer, err := freeAddr(), freeAddr(), error(nil)
	if client == "" || peer == "" {
		err = errors.New("no free loopback port")
	}
	var e *embed.Etcd
	if err == nil {
		cfg := embed.NewConfig()
		cfg.Name = "streamlb-demo"
		cfg.Dir = dir
		cu, pu := url.URL{Scheme: "http", Host: client}, url.URL{Scheme: "http", Host: peer}
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
		cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
		cfg.Logger = "zap"
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		cfg.UnsafeNoFsync = true // a demo's data need not survive a crash
		e, err = embed.StartEtcd(cfg)
	}
	if err == nil {
		select {
		case <-e.Server.ReadyNotify():
		case <-time.After(10 * time.Second):
			e.Close()
			err = errors.New("not ready after 10s")
		}
	}
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("demo: embedded etcd: %w", err)
	}
	return &etcdPublisher{e: e, dir: dir, endpoint: client, ttl: ttl, regs: map[string]*testserver.Registration{}}, nil
}

// freeAddr returns a loopback address that was free a moment ago, or "".
func freeAddr() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return ""
	}
	defer ln.Close()
	return ln.Addr().String()
}

func (p *etcdPublisher) target() string {
	return fmt.Sprintf("etcd://%s/kitex/registry-etcd/%s", p.endpoint, etcdService)
}

func (p *etcdPublisher) describe(time.Duration) string {
	return fmt.Sprintf("pods register in an embedded etcd at %s as Kitex services do (lease TTL %v, kept alive); streamlb watches kitex/registry-etcd/%s/", p.endpoint, p.ttl, etcdService)
}

func (p *etcdPublisher) publish(ctx context.Context, addrs []string) error {
	want := map[string]bool{}
	for _, a := range addrs {
		want[a] = true
		if p.regs[a] != nil {
			continue
		}
		r, err := testserver.RegisterEtcd(ctx, p.target(), a, testserver.RegisterOptions{TTL: p.ttl})
		if err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		p.regs[a] = r
	}
	for a, r := range p.regs {
		if want[a] {
			continue
		}
		if err := r.Deregister(ctx); err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		delete(p.regs, a)
	}
	return nil
}

func (p *etcdPublisher) kill(addr string) time.Duration {
	if r := p.regs[addr]; r != nil {
		r.Abandon()
		delete(p.regs, addr)
	}
	return p.ttl
}

func (p *etcdPublisher) close() {
	for a, r := range p.regs {
		r.Abandon() // the etcd goes too
		delete(p.regs, a)
	}
	p.e.Close()
	<-p.e.Server.StopNotify()
	os.RemoveAll(p.dir)
}
