package resolver

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Target schemes recognised by [ParseTarget]. A static target has no scheme.
const (
	// SchemeDNS resolves A/AAAA records: "dns:///name:port" uses the system
	// resolver, "dns://dnshost:dnsport/name:port" asks the given server.
	SchemeDNS = "dns"
	// SchemeDNSSRV resolves SRV records, which carry ports and weights:
	// "dns+srv:///_grpc._tcp.name".
	SchemeDNSSRV = "dns+srv"
	// SchemeEtcd follows the keys under a prefix in etcd:
	// "etcd://host:port[,host:port...]/PREFIX[?format=F]". See [Etcd].
	SchemeEtcd = "etcd"
	// SchemeZK follows the children of a ZooKeeper node:
	// "zk://host:port[,host:port...]/PATH[?format=F]". See [ZK].
	SchemeZK = "zk"
)

// Weight bounds for the ";weight=N" suffix of a static target.
const (
	MinWeight = 1
	MaxWeight = 10000
)

// Target is a parsed target. The zero value is not a valid target; obtain
// one from [ParseTarget]. Targets are comparable, and two targets that name
// the same endpoint in different spellings (host name case, IPv6 zero
// compression, leading zeros in the port) parse to equal values.
type Target struct {
	// Scheme is "" for a static host:port, [SchemeDNS], [SchemeDNSSRV],
	// [SchemeEtcd] or [SchemeZK].
	Scheme string
	// Authority is the DNS server as a canonical "host:port" for
	// "dns://dnshost:dnsport/...", and "" when the system resolver is meant
	// or the target is static. For SchemeEtcd it is the etcd endpoints,
	// canonical "host:port" joined by commas, in the order given; likewise
	// the ZooKeeper servers for SchemeZK.
	Authority string
	// Host is an IP literal (IPv6 without brackets) or a lower-case host
	// name. For SchemeDNSSRV it is the SRV owner name, such as
	// "_grpc._tcp.example.com". For SchemeEtcd it is the key prefix as
	// given (case kept), without trailing '/': the resolver follows the
	// keys under Host+"/". For SchemeZK it is the node's path with one
	// leading '/' and none trailing.
	Host string
	// Port is 1..65535, or 0 for SchemeDNSSRV where SRV records carry it
	// and for SchemeEtcd and SchemeZK.
	Port uint16
	// Format is, for SchemeEtcd, the "?format=" value ([EtcdFormats]), and
	// for SchemeZK ([ZKFormats]); "" means each key's or node's format is
	// detected.
	Format string
	// Weight is the ";weight=N" suffix of a static target, or 0 if absent
	// (meaning the default weight, 1).
	Weight uint32
}

// IsStatic reports whether t names one fixed endpoint that needs no lookup.
func (t Target) IsStatic() bool { return t.Scheme == "" }

// Addr returns the endpoint without scheme, authority or weight: "host:port"
// (with brackets around IPv6), or the bare SRV name for SchemeDNSSRV.
func (t Target) Addr() string {
	if t.Port == 0 {
		return t.Host
	}
	return net.JoinHostPort(t.Host, strconv.FormatUint(uint64(t.Port), 10))
}

// String returns t in canonical form. [ParseTarget] of the result yields t
// again.
func (t Target) String() string {
	if t.IsStatic() {
		if t.Weight == 0 {
			return t.Addr()
		}
		return t.Addr() + ";weight=" + strconv.FormatUint(uint64(t.Weight), 10)
	}
	if t.Scheme == SchemeEtcd || t.Scheme == SchemeZK {
		host := t.Host
		if t.Scheme == SchemeZK {
			host = strings.TrimPrefix(host, "/") // always absolute
		}
		s := t.Scheme + "://" + t.Authority + "/" + host
		if t.Format != "" {
			s += "?format=" + t.Format
		}
		return s
	}
	return t.Scheme + "://" + t.Authority + "/" + t.Addr()
}

// ParseTarget parses a user-supplied target. It accepts:
//
//   - a static "host:port", where host is an IPv4 literal, a bracketed IPv6
//     literal or a host name, and port is 1..65535, optionally followed by
//     ";weight=N" with N in [MinWeight]..[MaxWeight];
//   - "dns:///name:port" and "dns://dnshost:dnsport/name:port";
//   - "dns+srv:///name" and "dns+srv://dnshost:dnsport/name";
//   - "etcd://host:port[,host:port...]/PREFIX[?format=F]", the keys under
//     PREFIX+"/" in etcd, with F one of [EtcdFormats] (default: detected
//     per key);
//   - "zk://host:port[,host:port...]/PATH[?format=F]", the children of the
//     ZooKeeper node PATH, with F one of [ZKFormats] (default: detected per
//     child).
//
// Parsing is purely syntactic: it does no I/O and does not check that a
// name resolves. Errors have the form `resolver: target "s": reason`. It is
// safe for concurrent use.
func ParseTarget(s string) (Target, error) {
	t, err := parseTarget(s)
	if err != nil {
		return Target{}, fmt.Errorf("resolver: target %q: %w", s, err)
	}
	return t, nil
}

func parseTarget(s string) (Target, error) {
	if s == "" {
		return Target{}, errors.New("empty target")
	}
	if strings.TrimSpace(s) != s {
		return Target{}, errors.New("leading or trailing white space")
	}
	endpoint, params, hasParams := strings.Cut(s, ";")

	if scheme, rest, ok := strings.Cut(endpoint, "://"); ok {
		if strings.EqualFold(scheme, SchemeEtcd) || strings.EqualFold(scheme, SchemeZK) {
			// A key prefix or node path may contain ';', so the
			// registry forms are cut before the static parameters are.
			return parseRegistryTarget(strings.ToLower(scheme), s[len(scheme)+len("://"):])
		}
		if hasParams {
			return Target{}, errors.New("parameters such as \";weight=N\" are only supported on static host:port targets")
		}
		return parseSchemeTarget(strings.ToLower(scheme), rest)
	}

	host, port, err := parseHostPort(endpoint)
	if err != nil {
		return Target{}, err
	}
	if err := checkBackendHost(host); err != nil {
		return Target{}, err
	}
	t := Target{Host: host, Port: port}
	if hasParams {
		if t.Weight, err = parseParams(params); err != nil {
			return Target{}, err
		}
	}
	return t, nil
}

// parseSchemeTarget parses what follows "scheme://".
func parseSchemeTarget(scheme, rest string) (Target, error) {
	if scheme != SchemeDNS && scheme != SchemeDNSSRV {
		return Target{}, fmt.Errorf("unknown scheme %q (want %q, %q, %q, %q or a static host:port)", scheme, SchemeDNS, SchemeDNSSRV, SchemeEtcd, SchemeZK)
	}
	authority, endpoint, ok := strings.Cut(rest, "/")
	if !ok {
		return Target{}, fmt.Errorf("missing '/' after %s://authority; use %s:///name for the system resolver", scheme, scheme)
	}
	t := Target{Scheme: scheme}
	if authority != "" {
		host, port, err := parseHostPort(authority)
		if err != nil {
			return Target{}, fmt.Errorf("dns server: %w", err)
		}
		t.Authority = net.JoinHostPort(host, strconv.FormatUint(uint64(port), 10))
	}
	if endpoint == "" {
		return Target{}, errors.New("missing name after authority")
	}
	if scheme == SchemeDNSSRV {
		if strings.Contains(endpoint, ":") {
			return Target{}, errors.New("SRV name must not have a port; SRV records carry the ports")
		}
		if err := checkHostname(endpoint, true); err != nil {
			return Target{}, err
		}
		t.Host = strings.ToLower(endpoint)
		return t, nil
	}
	host, port, err := parseHostPort(endpoint)
	if err != nil {
		return Target{}, err
	}
	if err := checkBackendHost(host); err != nil {
		return Target{}, err // an IP literal needs no lookup (DNS.resolve): it is the backend
	}
	t.Host, t.Port = host, port
	return t, nil
}

// checkBackendHost refuses a backend given as an IP literal that no
// backend can have (usableAddr): an unspecified address (0.0.0.0, ::),
// which a dial on Linux takes to this very host, the proxy itself
// included, and multicast or broadcast addresses, which take no TCP
// connection. DNS and registry answers of such addresses are skipped with
// a warning instead (usableAddrs, decodeHostPort): the other addresses of
// the answer still make a set.
func checkBackendHost(host string) error {
	what := unusableKind(host)
	switch what {
	case "":
		return nil
	case "unspecified IP":
		return fmt.Errorf("%s %s is not a backend address: a dial to it reaches this host; give the backend's own address", what, host)
	}
	return fmt.Errorf("%s %s is not a backend address: it takes no TCP connection", what, host)
}

// parseRegistryTarget parses what follows "etcd://" or "zk://":
// "host:port[,host:port...]/PATH[?format=F]".
func parseRegistryTarget(scheme, rest string) (Target, error) {
	what, placeholder := "key prefix", "PREFIX"
	if scheme == SchemeZK {
		what, placeholder = "node path", "PATH"
	}
	authority, path, ok := strings.Cut(rest, "/")
	if !ok {
		return Target{}, fmt.Errorf("missing '/%s' after %s://endpoints", placeholder, scheme)
	}
	if authority == "" {
		return Target{}, fmt.Errorf("missing %s endpoint: give %s://host:port[,host:port...]/%s", scheme, scheme, placeholder)
	}
	var eps []string
	for ep := range strings.SplitSeq(authority, ",") {
		host, port, err := parseHostPort(ep)
		if err != nil {
			return Target{}, fmt.Errorf("%s endpoint %q: %w", scheme, ep, err)
		}
		eps = append(eps, net.JoinHostPort(host, strconv.FormatUint(uint64(port), 10)))
	}
	t := Target{Scheme: scheme, Authority: strings.Join(eps, ",")}
	path, query, hasQuery := strings.Cut(path, "?")
	if hasQuery {
		key, value, _ := strings.Cut(query, "=")
		if key != "format" || strings.ContainsAny(value, "&=") {
			return Target{}, fmt.Errorf("invalid query %q: only format=F is known", query)
		}
		parse := parseEtcdFormat
		if scheme == SchemeZK {
			parse = parseZKFormat
		}
		f, err := parse(value)
		if err != nil {
			return Target{}, err
		}
		t.Format = f
	}
	// The etcd resolver always appends one '/', so "svc" never matches
	// "svc-canary/..."; a trailing '/' given by the user is the same one.
	t.Host = strings.TrimRight(path, "/")
	if strings.Trim(t.Host, "/") == "" {
		return Target{}, fmt.Errorf("missing %s after %s://endpoints/", what, scheme)
	}
	for _, r := range t.Host {
		if r < 0x21 || r == 0x7f || r == utf8.RuneError {
			return Target{}, fmt.Errorf("%s %q: white space, control or invalid characters are not allowed", what, t.Host)
		}
	}
	if scheme == SchemeZK {
		// ZooKeeper paths are absolute and have no empty segments.
		t.Host = "/" + strings.TrimLeft(t.Host, "/")
		if strings.Contains(t.Host, "//") {
			return Target{}, fmt.Errorf("node path %q: empty path segment", t.Host)
		}
	}
	return t, nil
}

// parseHostPort splits and validates "host:port". The host comes back in
// canonical form: IP literals as netip.Addr.String writes them, host names
// in lower case.
func parseHostPort(s string) (host string, port uint16, err error) {
	var rawPort string
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return "", 0, errors.New("missing ']' after IPv6 address")
		}
		rawHost, after := s[1:end], s[end+1:]
		if after == "" {
			return "", 0, errors.New("missing port")
		}
		if after[0] != ':' {
			return "", 0, fmt.Errorf("unexpected %q after ']'", after)
		}
		rawPort = after[1:]
		host, err = parseIPv6(rawHost)
		if err != nil {
			return "", 0, err
		}
	} else {
		switch strings.Count(s, ":") {
		case 0:
			return "", 0, errors.New("missing port")
		case 1:
		default:
			return "", 0, errors.New("too many colons; enclose an IPv6 address in brackets, as in [::1]:443")
		}
		var rawHost string
		rawHost, rawPort, _ = strings.Cut(s, ":")
		host, err = parseHost(rawHost)
		if err != nil {
			return "", 0, err
		}
	}
	port, err = parsePort(rawPort)
	if err != nil {
		return "", 0, err
	}
	return host, port, nil
}

// parseIPv6 validates the inside of "[...]".
func parseIPv6(s string) (string, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return "", fmt.Errorf("invalid IPv6 address %q: %w", s, err)
	}
	if !a.Is6() {
		return "", fmt.Errorf("brackets are only for IPv6 addresses, got %q", s)
	}
	if zone := a.Zone(); zone != "" {
		// Keep zones to characters that survive the round trip through
		// "[addr%zone]:port" and our own ";" and "/" separators.
		for _, c := range []byte(zone) {
			if !isAlnum(c) && c != '-' && c != '_' && c != '.' {
				return "", fmt.Errorf("invalid IPv6 zone %q", zone)
			}
		}
	}
	return a.String(), nil
}

// parseHost validates an unbracketed host: an IPv4 literal or a host name.
func parseHost(s string) (string, error) {
	if s == "" {
		return "", errors.New("missing host")
	}
	if a, err := netip.ParseAddr(s); err == nil {
		if !a.Is4() {
			// Unreachable with at most one colon, but cheap to keep honest.
			return "", fmt.Errorf("enclose IPv6 address %q in brackets", s)
		}
		return a.String(), nil
	}
	if err := checkHostname(s, false); err != nil {
		return "", err
	}
	return strings.ToLower(s), nil
}

// checkHostname validates a DNS name per RFC 1123 §2.1: dot-separated labels
// of 1..63 letters, digits and hyphens, not starting or ending with a hyphen,
// at most 253 characters, with an optional trailing dot. The last label may
// not be all digits (RFC 3696 §2), which catches malformed IPv4 addresses
// such as "10.0.0.256". allowUnderscore admits the "_service._proto" labels
// of SRV names (RFC 2782).
func checkHostname(s string, allowUnderscore bool) error {
	name := strings.TrimSuffix(s, ".")
	if name == "" || len(name) > 253 {
		return fmt.Errorf("invalid host name %q: length must be 1..253", s)
	}
	var last string
	for label := range strings.SplitSeq(name, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("invalid host name %q: each label must be 1..63 characters", s)
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("invalid host name %q: label %q starts or ends with '-'", s, label)
		}
		for _, c := range []byte(label) {
			if !isAlnum(c) && c != '-' && (c != '_' || !allowUnderscore) {
				return fmt.Errorf("invalid host name %q: character %q not allowed", s, c)
			}
		}
		last = label
	}
	if strings.Trim(last, "0123456789") == "" {
		return fmt.Errorf("invalid host %q: neither an IP address nor a host name", s)
	}
	return nil
}

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

// parsePort parses a decimal port in 1..65535.
func parsePort(s string) (uint16, error) {
	if s == "" {
		return 0, errors.New("missing port")
	}
	if !isDigits(s) {
		return 0, fmt.Errorf("invalid port %q: not a decimal number", s)
	}
	p, err := strconv.ParseUint(s, 10, 16)
	if err != nil {
		return 0, fmt.Errorf("invalid port %q: must be 1..65535: %w", s, err)
	}
	if p == 0 {
		return 0, fmt.Errorf("invalid port %q: must be 1..65535", s)
	}
	return uint16(p), nil
}

// parseParams parses the ";key=value" list after a static host:port. Only
// "weight" is known today.
func parseParams(params string) (weight uint32, err error) {
	for param := range strings.SplitSeq(params, ";") {
		key, value, ok := strings.Cut(param, "=")
		if !ok || key == "" {
			return 0, fmt.Errorf("invalid parameter %q: want key=value", param)
		}
		if key != "weight" {
			return 0, fmt.Errorf("unknown parameter %q (want weight)", key)
		}
		if weight != 0 {
			return 0, errors.New("weight given more than once")
		}
		if !isDigits(value) {
			return 0, fmt.Errorf("invalid weight %q: not a decimal number", value)
		}
		w, err := strconv.ParseUint(value, 10, 32)
		if err != nil {
			return 0, fmt.Errorf("invalid weight %q: must be %d..%d: %w", value, MinWeight, MaxWeight, err)
		}
		if w < MinWeight || w > MaxWeight {
			return 0, fmt.Errorf("invalid weight %q: must be %d..%d", value, MinWeight, MaxWeight)
		}
		weight = uint32(w)
	}
	return weight, nil
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}
