package testserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/miekg/dns"
)

// DefaultDNSTTL is the TTL, in seconds, of records whose name has no TTL
// set with [DNSServer.SetTTL] when [DNSConfig.DefaultTTL] is zero.
const DefaultDNSTTL = 5

// startAttempts bounds how often Start picks a new TCP port when the UDP
// port of the same number is taken.
const startAttempts = 10

// DNSConfig configures a [DNSServer]. The zero value is usable.
type DNSConfig struct {
	// Zone, if set (for example "cluster.local."), makes the server
	// authoritative for that zone only: queries for names outside it are
	// REFUSED, and negative answers (NXDOMAIN, NODATA) carry the zone's SOA
	// record in the authority section, whose minimum field gives the
	// negative-caching TTL (RFC 2308 §5). Empty means the server answers
	// any name, NXDOMAIN for names it has no records for, without SOA.
	Zone string
	// DefaultTTL is the TTL, in seconds, of records whose name has no TTL
	// set with SetTTL. Zero means DefaultDNSTTL.
	DefaultTTL uint32
	// OmitAdditional leaves the additional section of SRV answers empty,
	// as some servers do, so clients must look the targets up themselves.
	OmitAdditional bool
	// Logger receives the server's logs, with component=testserver and
	// role=dns added. Nil means slog.Default().
	Logger *slog.Logger
}

// SRV is one SRV record (RFC 2782) given to [DNSServer.SetSRV].
type SRV struct {
	// Target is the host name the record points at. When the server has A
	// or AAAA records for it, they are added to the additional section.
	Target string
	// Port is the port of the service on Target.
	Port uint16
	// Priority orders targets: clients use the lowest value first.
	Priority uint16
	// Weight is the relative weight among targets of equal Priority.
	Weight uint16
}

// DNSServer is an embedded authoritative DNS server for tests and demos,
// built on github.com/miekg/dns. It stands in for Kubernetes cluster DNS
// answering for a headless service: one A (or AAAA) record per pod, which
// tests change while a resolver is watching.
//
// Create it with NewDNSServer, set records at any time, Start it and Stop
// it. Names are case-insensitive and may be given with or without the
// trailing dot. All methods are safe for concurrent use; record changes are
// visible to the next query.
type DNSServer struct {
	// Immutable after NewDNSServer.
	zone       string // canonical, "" for any name
	defaultTTL uint32
	omitExtra  bool
	logger     *slog.Logger

	queries atomic.Int64

	mu       sync.Mutex // mu guards the fields below.
	names    map[string]*dnsName
	failure  int  // rcode every query is answered with; 0 = normal
	down     bool // drop every query
	addr     string
	udp      *dns.Server // nil until Start
	tcp      *dns.Server // nil until Start
	starting bool        // Start was called
	stopped  bool        // Stop was called

	// wg counts the serving goroutines started by Start.
	wg sync.WaitGroup
}

// dnsName is the record set of one name.
type dnsName struct {
	addrs []netip.Addr // A (Is4) and AAAA records, in the order given
	srvs  []SRV
	ttl   uint32 // 0 means the server's default
}

// NewDNSServer returns a server with no records. It starts nothing.
func NewDNSServer(cfg DNSConfig) *DNSServer {
	s := &DNSServer{
		defaultTTL: cfg.DefaultTTL,
		omitExtra:  cfg.OmitAdditional,
		logger:     cfg.Logger,
		names:      make(map[string]*dnsName),
	}
	if cfg.Zone != "" {
		s.zone = dns.CanonicalName(cfg.Zone)
	}
	if s.defaultTTL == 0 {
		s.defaultTTL = DefaultDNSTTL
	}
	if s.logger == nil {
		s.logger = slog.Default()
	}
	s.logger = s.logger.With("component", "testserver", "role", "dns")
	return s
}

// Start listens on addr (for example "127.0.0.1:0") over both UDP and TCP on
// the same port, and serves in goroutines owned by the server until Stop.
// With port 0 it binds UDP first, then TCP on the port UDP got, and picks
// another port if that TCP port is taken. It returns once both listeners
// are serving, so Addr is valid and clients may query. Start may be called
// at most once, and not after Stop.
func (s *DNSServer) Start(addr string) error {
	s.mu.Lock()
	if s.starting || s.stopped {
		s.mu.Unlock()
		return errors.New("testserver: dns: start: already started or stopped")
	}
	s.starting = true
	s.mu.Unlock()

	// mu is not held from here on: handlers take it, and a failed start
	// waits for them.
	pc, ln, err := listenUDPTCP(addr)
	if err != nil {
		return fmt.Errorf("testserver: dns: start: %w", err)
	}
	udp := &dns.Server{PacketConn: pc, Handler: s}
	tcp := &dns.Server{Listener: ln, Handler: s}
	if err := s.serve(udp); err != nil {
		ln.Close()
		return fmt.Errorf("testserver: dns: start udp: %w", err)
	}
	if err := s.serve(tcp); err != nil {
		_ = udp.Shutdown()
		s.wg.Wait()
		return fmt.Errorf("testserver: dns: start tcp: %w", err)
	}

	s.mu.Lock()
	stopped := s.stopped
	if !stopped {
		s.udp, s.tcp = udp, tcp
		s.addr = pc.LocalAddr().String()
	}
	s.mu.Unlock()
	if stopped { // Stop ran concurrently and found nothing to stop
		_ = udp.Shutdown()
		_ = tcp.Shutdown()
		s.wg.Wait()
		return errors.New("testserver: dns: start: stopped while starting")
	}
	s.logger.Info("serving", "addr", pc.LocalAddr().String())
	return nil
}

// listenUDPTCP binds UDP and TCP on the same address. When the port is 0 it
// takes a TCP port first, then the same UDP port, and retries with a new
// TCP port if UDP cannot have it. TCP first: a busy machine's outgoing
// TCP connections hold thousands of ports of the ephemeral range, which a
// listener cannot bind, while few UDP ports are taken; UDP first failed
// ten times in a row beside a test holding thousands of connections.
func listenUDPTCP(addr string) (net.PacketConn, net.Listener, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, err
	}
	attempts := 1
	if port == "0" {
		attempts = startAttempts
	}
	for i := 0; ; i++ {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, nil, err
		}
		tcpPort := ln.Addr().(*net.TCPAddr).Port
		pc, err := net.ListenPacket("udp", net.JoinHostPort(host, strconv.Itoa(tcpPort)))
		if err == nil {
			return pc, ln, nil
		}
		ln.Close()
		if i+1 >= attempts {
			return nil, nil, err
		}
	}
}

// serve runs srv in a goroutine counted by s.wg and returns once srv is
// serving, or with the error that ended it before it did.
func (s *DNSServer) serve(srv *dns.Server) error {
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	failed := make(chan error, 1)
	s.wg.Add(1)
	go s.serveLoop(srv, failed)
	select {
	case <-started:
		return nil
	case err := <-failed:
		return err
	}
}

// serveLoop runs srv until it is shut down. An error before that is sent
// on failed (capacity 1), which serve reads if srv never started.
func (s *DNSServer) serveLoop(srv *dns.Server, failed chan<- error) {
	defer s.wg.Done()
	if err := srv.ActivateAndServe(); err != nil {
		failed <- err
		s.logger.Error("serve failed", "err", err)
	}
}

// Addr returns the "host:port" the server answers on, over UDP and TCP,
// once Start has returned, and "" before.
func (s *DNSServer) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Stop closes the listeners and returns once the serving goroutines, and
// the handlers they run, have exited. It is safe to call more than once and
// before Start.
func (s *DNSServer) Stop() {
	s.mu.Lock()
	udp, tcp := s.udp, s.tcp
	s.stopped = true
	s.mu.Unlock()
	// Shutdown only errors when the server never started, which Start
	// rules out for servers it stored.
	if udp != nil {
		_ = udp.Shutdown()
	}
	if tcp != nil {
		_ = tcp.Shutdown()
	}
	s.wg.Wait()
}

// SetA replaces the A and AAAA records of name with ips, each an IPv4
// literal (an A record) or an IPv6 literal (an AAAA record). With no ips,
// name still exists but has no addresses, so A and AAAA queries get
// NOERROR with an empty answer (NODATA). SRV records of name are kept. It
// panics on an invalid IP literal, a programmer error in a test.
func (s *DNSServer) SetA(name string, ips ...string) {
	addrs := make([]netip.Addr, 0, len(ips))
	for _, ip := range ips {
		a, err := netip.ParseAddr(ip)
		if err != nil {
			panic(fmt.Sprintf("testserver: dns: SetA(%q): %v", name, err))
		}
		addrs = append(addrs, a.Unmap())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entry(name).addrs = addrs
}

// SetSRV replaces the SRV records of name (such as
// "_grpc._tcp.backend.default.svc.cluster.local") with targets. With no
// targets, SRV queries get NODATA. A and AAAA records of name are kept.
func (s *DNSServer) SetSRV(name string, targets ...SRV) {
	srvs := make([]SRV, len(targets))
	copy(srvs, targets)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entry(name).srvs = srvs
}

// SetTTL sets the TTL, in seconds, of all records of name, creating name
// with no records if it does not exist. 0 restores the default.
func (s *DNSServer) SetTTL(name string, ttl uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entry(name).ttl = ttl
}

// Remove deletes name and all its records, so queries for it get NXDOMAIN.
func (s *DNSServer) Remove(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.names, dns.CanonicalName(name))
}

// SetFailure makes the server answer every query with rcode, for example
// dns.RcodeServerFailure or dns.RcodeRefused, and no records. 0
// (dns.RcodeSuccess) restores normal answers.
func (s *DNSServer) SetFailure(rcode int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failure = rcode
}

// SetDown makes the server drop every query without answering while down is
// true, so clients time out as with an unreachable server. Queries are
// still counted.
func (s *DNSServer) SetDown(down bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.down = down
}

// Queries returns the number of queries received so far, over UDP and TCP,
// including dropped and failed ones.
func (s *DNSServer) Queries() int64 { return s.queries.Load() }

// entry returns the record set of name, creating it. Caller must hold mu.
func (s *DNSServer) entry(name string) *dnsName {
	key := dns.CanonicalName(name)
	e := s.names[key]
	if e == nil {
		e = &dnsName{}
		s.names[key] = e
	}
	return e
}

// ServeDNS implements dns.Handler. It is called by the miekg/dns servers
// started by Start, one goroutine per query.
func (s *DNSServer) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	s.queries.Add(1)
	resp, ok := s.answer(req)
	if !ok {
		return // down: let the client time out
	}
	if s.logger.Enabled(context.Background(), slog.LevelDebug) {
		s.logger.Debug("query", "question", req.Question, "rcode", dns.RcodeToString[resp.Rcode],
			"answers", len(resp.Answer), "net", w.LocalAddr().Network())
	}
	// RFC 1035 §4.2.1 limits UDP answers to 512 bytes unless the query
	// advertises a larger EDNS0 buffer (RFC 6891 §6.2.5). Truncate sets TC
	// so the client retries over TCP.
	if _, isUDP := w.LocalAddr().(*net.UDPAddr); isUDP {
		size := dns.MinMsgSize
		if opt := req.IsEdns0(); opt != nil {
			size = int(opt.UDPSize())
		}
		resp.Truncate(size)
	}
	if err := w.WriteMsg(resp); err != nil {
		s.logger.Debug("write failed", "err", err)
	}
}

// answer builds the response to req, or returns false if the query is to be
// dropped.
func (s *DNSServer) answer(req *dns.Msg) (*dns.Msg, bool) {
	resp := new(dns.Msg)
	resp.SetReply(req)
	resp.Authoritative = true
	if opt := req.IsEdns0(); opt != nil {
		resp.SetEdns0(opt.UDPSize(), false)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return nil, false
	}
	if s.failure != dns.RcodeSuccess {
		resp.Authoritative = false
		resp.Rcode = s.failure
		return resp, true
	}
	if len(req.Question) != 1 {
		resp.Rcode = dns.RcodeFormatError
		return resp, true
	}
	q := req.Question[0]
	key := dns.CanonicalName(q.Name)
	if s.zone != "" && !dns.IsSubDomain(s.zone, key) {
		resp.Authoritative = false
		resp.Rcode = dns.RcodeRefused
		return resp, true
	}
	e := s.names[key]
	if e == nil {
		resp.Rcode = dns.RcodeNameError
		s.addSOA(resp)
		return resp, true
	}
	ttl := s.ttl(e)
	switch q.Qtype {
	case dns.TypeA, dns.TypeAAAA:
		resp.Answer = addressRRs(q.Name, q.Qtype, e.addrs, ttl)
	case dns.TypeSRV:
		for _, srv := range e.srvs {
			target := dns.Fqdn(srv.Target)
			resp.Answer = append(resp.Answer, &dns.SRV{
				Hdr:      dns.RR_Header{Name: q.Name, Rrtype: dns.TypeSRV, Class: dns.ClassINET, Ttl: ttl},
				Priority: srv.Priority,
				Weight:   srv.Weight,
				Port:     srv.Port,
				Target:   target,
			})
			// RFC 2782: the additional section may carry the targets'
			// addresses, which saves the client a lookup per target.
			if te := s.names[dns.CanonicalName(target)]; te != nil && !s.omitExtra {
				tttl := s.ttl(te)
				resp.Extra = append(resp.Extra, addressRRs(target, dns.TypeA, te.addrs, tttl)...)
				resp.Extra = append(resp.Extra, addressRRs(target, dns.TypeAAAA, te.addrs, tttl)...)
			}
		}
	}
	if len(resp.Answer) == 0 {
		s.addSOA(resp) // NODATA
	}
	return resp, true
}

// ttl returns the TTL of e's records. Caller must hold mu.
func (s *DNSServer) ttl(e *dnsName) uint32 {
	if e.ttl != 0 {
		return e.ttl
	}
	return s.defaultTTL
}

// addSOA adds the zone's SOA record to a negative answer, if a zone is
// configured. RFC 2308 §3: the negative-caching TTL is the minimum of the
// SOA's TTL and its minimum field. Caller must hold mu.
func (s *DNSServer) addSOA(resp *dns.Msg) {
	if s.zone == "" {
		return
	}
	resp.Ns = append(resp.Ns, &dns.SOA{
		Hdr:     dns.RR_Header{Name: s.zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: s.defaultTTL},
		Ns:      dns.Fqdn("ns." + strings.TrimSuffix(s.zone, ".")),
		Mbox:    dns.Fqdn("hostmaster." + strings.TrimSuffix(s.zone, ".")),
		Serial:  1,
		Refresh: 3600,
		Retry:   600,
		Expire:  86400,
		Minttl:  s.defaultTTL,
	})
}

// addressRRs returns the A (qtype dns.TypeA) or AAAA records of owner for
// the addresses of that family.
func addressRRs(owner string, qtype uint16, addrs []netip.Addr, ttl uint32) []dns.RR {
	var rrs []dns.RR
	for _, a := range addrs {
		hdr := dns.RR_Header{Name: owner, Rrtype: qtype, Class: dns.ClassINET, Ttl: ttl}
		switch {
		case qtype == dns.TypeA && a.Is4():
			rrs = append(rrs, &dns.A{Hdr: hdr, A: a.AsSlice()})
		case qtype == dns.TypeAAAA && a.Is6():
			rrs = append(rrs, &dns.AAAA{Hdr: hdr, AAAA: a.AsSlice()})
		}
	}
	return rrs
}
