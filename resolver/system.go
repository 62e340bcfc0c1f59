package resolver

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// systemLookuper resolves like the host's C library would for the
// "dns:///name" forms: /etc/hosts first (the usual nsswitch "hosts: files
// dns"), then the name servers and search list of /etc/resolv.conf, asked
// with miekg/dns so answers carry TTLs.
//
// /etc/hosts is read through a net.Resolver whose DNS transport always
// fails, which leaves Go's own hosts-file lookup and sends nothing on the
// network. resolv.conf is re-read on each lookup, so a changed file takes
// effect at the next refresh. If it names no servers, lookups fall back to
// net.DefaultResolver, without TTLs.
type systemLookuper struct {
	resolvConf string // path, normally "/etc/resolv.conf"
	port       string // if set, replaces resolv.conf's port 53 (tests)
	timeout    time.Duration
	hosts      interface {
		LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
	}
	fallback interface {
		LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
		LookupSRV(ctx context.Context, service, proto, name string) (string, []*net.SRV, error)
	}
}

// errNoNetwork is what the hosts-only resolver's transport returns.
var errNoNetwork = errors.New("resolver: hosts file only")

func newSystemLookuper(resolvConf string, timeout time.Duration) *systemLookuper {
	return &systemLookuper{
		resolvConf: resolvConf,
		timeout:    timeout,
		hosts: &net.Resolver{
			PreferGo: true,
			Dial: func(context.Context, string, string) (net.Conn, error) {
				return nil, errNoNetwork
			},
		},
		fallback: net.DefaultResolver,
	}
}

// client returns a DNS client for the servers of resolv.conf, or nil if it
// names none or cannot be read.
func (s *systemLookuper) client() *dnsClient {
	conf, err := dns.ClientConfigFromFile(s.resolvConf)
	if err != nil || len(conf.Servers) == 0 {
		return nil
	}
	port := conf.Port
	if s.port != "" {
		port = s.port
	}
	servers := make([]string, len(conf.Servers))
	for i, srv := range conf.Servers {
		servers[i] = net.JoinHostPort(srv, port)
	}
	return newDNSClient(servers, conf.NameList, s.timeout)
}

func (s *systemLookuper) lookupHost(ctx context.Context, host string) ([]netip.Addr, time.Duration, error) {
	if addrs, err := s.hosts.LookupNetIP(ctx, "ip", host); err == nil && len(addrs) > 0 {
		return unmapAll(addrs), noTTL, nil
	}
	if c := s.client(); c != nil {
		return c.lookupHost(ctx, host)
	}
	addrs, err := s.fallback.LookupNetIP(ctx, "ip", host)
	if err != nil {
		var dnsErr *net.DNSError
		if errors.As(err, &dnsErr) && dnsErr.IsNotFound {
			return nil, noTTL, nil
		}
		return nil, 0, err
	}
	return unmapAll(addrs), noTTL, nil
}

func (s *systemLookuper) lookupSRV(ctx context.Context, name string) ([]srvRecord, time.Duration, error) {
	if c := s.client(); c != nil {
		return c.lookupSRV(ctx, name)
	}
	_, srvs, err := s.fallback.LookupSRV(ctx, "", "", name)
	if err != nil {
		var dnsErr *net.DNSError
		if errors.As(err, &dnsErr) && dnsErr.IsNotFound {
			return nil, noTTL, nil
		}
		return nil, 0, err
	}
	var recs []srvRecord
	for _, srv := range srvs {
		recs = append(recs, srvRecord{target: srv.Target, port: srv.Port, priority: srv.Priority, weight: srv.Weight})
	}
	recs, err = firstUsableGroup(ctx, recs, func(ctx context.Context, rec *srvRecord) error {
		var err error
		rec.addrs, _, err = s.lookupHost(ctx, strings.TrimSuffix(rec.target, "."))
		return err
	})
	if err != nil {
		return nil, 0, err
	}
	return recs, noTTL, nil
}

func unmapAll(addrs []netip.Addr) []netip.Addr {
	out := make([]netip.Addr, len(addrs))
	for i, a := range addrs {
		out[i] = a.Unmap()
	}
	return out
}
