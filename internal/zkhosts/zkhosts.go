// Package zkhosts is the ZooKeeper host provider (zk.HostProvider) of the
// resolver's zk:// targets and of testserver's ZooKeeper registration: it
// looks the servers' names up again when the addresses it knows fail.
package zkhosts

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"time"
)

// lookupTimeout bounds one lookup of the ZooKeeper servers' names, as
// go-zookeeper's own DNSHostProvider bounds its (3 s).
const lookupTimeout = 3 * time.Second

// Provider is a zk.HostProvider: the ZooKeeper servers of a zk://
// target, their names resolved to addresses. go-zookeeper's own
// DNSHostProvider looks the names up once, when the client is made, and
// tries those addresses for ever after: a ZooKeeper server given by a DNS
// name that later points elsewhere (a pod rescheduled behind a headless
// Service, a VM replaced) was never found again, and the resolver kept a
// set that went stale. Provider looks the names up again each time the
// client has tried every address without getting a session (go-zookeeper's
// retryStart, after which it waits a second): so when the connection is
// lost and the addresses it knows fail, the next round tries what the
// names say now. With one server that is at once on a lost connection.
// A name whose lookup fails or finds nothing keeps the addresses it had.
// Servers given as IP literals are never looked up, as before: a target
// of IP literals only behaves as go-zookeeper's provider does.
//
// Init, Len, Next and Connected are called by the client's connection
// loop, one at a time; mu makes them safe from any goroutine anyway.
type Provider struct {
	// ctx ends lookups early when the resolver stops.
	ctx context.Context
	// lookup resolves a name to IP addresses (net.Resolver.LookupHost).
	lookup func(ctx context.Context, host string) ([]string, error)
	// shuffle orders the addresses of a lookup at random, as
	// go-zookeeper's provider does, so that proxies spread over the
	// ensemble (rand.Shuffle).
	shuffle func(n int, swap func(i, j int))

	mu      sync.Mutex          // guards the fields below
	servers []string            // as configured, "host:port"
	named   bool                // some server is a name, not an IP literal
	known   map[string][]string // each server's addresses, as last found
	addrs   []string            // the known addresses, "ip:port", shuffled
	curr    int                 // index in addrs of the last Next; -1 before the first
	last    int                 // index of the last connected address; -1: none yet
}

// New returns the provider of a client running under ctx (lookups end
// with it); nil lookup means net.DefaultResolver's.
func New(ctx context.Context, lookup func(ctx context.Context, host string) ([]string, error)) *Provider {
	if lookup == nil {
		lookup = net.DefaultResolver.LookupHost
	}
	return &Provider{ctx: ctx, lookup: lookup, shuffle: rand.Shuffle}
}

// Init takes the servers of the target ("host:port") and resolves them.
// It fails when none has an address, so that zk.Connect fails and Run
// tries again after its backoff; a server whose name does not resolve
// beside others that do is left out until a later lookup finds it.
func (h *Provider) Init(servers []string) error {
	named := false
	for _, s := range servers {
		host, _, err := net.SplitHostPort(s)
		if err != nil {
			return err
		}
		if _, err := netip.ParseAddr(host); err != nil {
			named = true
		}
	}
	known, addrs, err := h.resolve(servers, nil)
	if len(addrs) == 0 {
		if err == nil {
			err = fmt.Errorf("no address for %q", servers)
		}
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.servers, h.named, h.known, h.addrs = servers, named, known, addrs
	h.curr, h.last = -1, -1
	return nil
}

// resolve looks the servers up: it returns each server's addresses, a
// server whose lookup failed or found nothing keeping those it had in
// prev, all of them shuffled, and the lookup errors. It takes no lock: it
// may wait for DNS.
func (h *Provider) resolve(servers []string, prev map[string][]string) (map[string][]string, []string, error) {
	ctx, cancel := context.WithTimeout(h.ctx, lookupTimeout)
	defer cancel()
	known := make(map[string][]string, len(servers))
	var addrs []string
	var errs []error
	for _, s := range servers {
		host, port, err := net.SplitHostPort(s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		found := []string{s}
		if _, err := netip.ParseAddr(host); err != nil {
			ips, err := h.lookup(ctx, host)
			if err == nil && len(ips) == 0 {
				err = errors.New("no address")
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("lookup %s: %w", host, err))
				found = prev[s]
			} else {
				found = found[:0]
				for _, ip := range ips {
					found = append(found, net.JoinHostPort(ip, port))
				}
			}
		}
		if len(found) > 0 {
			known[s] = found
			addrs = append(addrs, found...)
		}
	}
	h.shuffle(len(addrs), func(i, j int) { addrs[i], addrs[j] = addrs[j], addrs[i] })
	return known, addrs, errors.Join(errs...)
}

// Len returns the number of addresses known.
func (h *Provider) Len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.addrs)
}

// Next returns the next address to try. retryStart is true when the
// client has tried every address since it last got a session (or since
// the first); then the names are looked up again first, and the round
// starts over with what they say.
func (h *Provider) Next() (server string, retryStart bool) {
	h.mu.Lock()
	h.curr = (h.curr + 1) % len(h.addrs)
	retryStart = h.curr == h.last
	if h.last == -1 {
		h.last = 0
	}
	named, servers, prev := h.named, h.servers, h.known
	h.mu.Unlock()
	if retryStart && named {
		// Never empty: every server keeps the addresses it had.
		known, addrs, _ := h.resolve(servers, prev)
		h.mu.Lock()
		h.known, h.addrs, h.curr, h.last = known, addrs, 0, 0
		h.mu.Unlock()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.addrs[h.curr], retryStart
}

// Connected notes that the address Next returned last got a session.
func (h *Provider) Connected() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.last = h.curr
}
