package resolver

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path"
	"strconv"
	"strings"
)

// Value formats of an etcd target, the "?format=" values of
// "etcd://.../PREFIX?format=F". Without ?format= each key's format is
// detected from its key and value.
const (
	// EtcdFormatNaming is etcd's own naming package
	// (go.etcd.io/etcd/client/v3/naming/endpoints), as grpc-go users
	// register with it: key "<target>/<anything>", value
	// {"Op":0,"Addr":"host:port","Metadata":...}.
	EtcdFormatNaming = "etcd-naming"
	// EtcdFormatKitex is kitex-contrib/registry-etcd: key
	// "kitex/registry-etcd/<service>/<host:port>", value
	// {"network":"tcp","address":"host:port","weight":10,"tags":{...}}.
	// The weight becomes [Address.Weight]; 0 is Kitex's default, 10.
	EtcdFormatKitex = "kitex"
	// EtcdFormatGoZero is go-zero's discov: key "<key>/<lease id>", value a
	// bare "host:port".
	EtcdFormatGoZero = "go-zero"
	// EtcdFormatKratos is Kratos's etcd registry: key
	// "/microservices/<name>/<id>", value JSON whose "endpoints" are URLs
	// such as "grpc://host:port?isSecure=false"; the grpc ones are used.
	EtcdFormatKratos = "kratos"
	// EtcdFormatGoMicro is go-micro's etcd registry: value JSON whose
	// "nodes" each have an "address".
	EtcdFormatGoMicro = "go-micro"
	// EtcdFormatDubbo is dubbo-go's etcd registry: key
	// "/dubbo/<interface>/providers/<URL-escaped provider URL>", empty
	// value; the address is the provider URL's host:port.
	EtcdFormatDubbo = "dubbo"
)

// kitexDefaultWeight is the weight Kitex gives an instance registered with
// weight 0 (discovery.DefaultWeight).
const kitexDefaultWeight = 10

// EtcdFormats returns the value formats an etcd target may name with
// "?format=".
func EtcdFormats() []string {
	return []string{EtcdFormatNaming, EtcdFormatKitex, EtcdFormatGoZero, EtcdFormatKratos, EtcdFormatGoMicro, EtcdFormatDubbo}
}

// parseEtcdFormat validates a "?format=" value; "auto" and "" mean
// detection and come back as "".
func parseEtcdFormat(s string) (string, error) {
	f := strings.ToLower(s)
	if f == "" || f == "auto" {
		return "", nil
	}
	for _, known := range EtcdFormats() {
		if f == known {
			return f, nil
		}
	}
	return "", fmt.Errorf("unknown format %q (want auto, %s)", s, strings.Join(EtcdFormats(), ", "))
}

// registryValue is the union of the JSON values the formats write. Go's
// JSON decoding matches names case-insensitively, so "Addr" (etcd naming)
// and "address" (Kitex) are distinct fields but "addr" would match Addr.
type registryValue struct {
	// etcd naming.
	Op   *int    `json:"Op"`
	Addr *string `json:"Addr"`
	// Kitex.
	Network *string `json:"network"`
	Address *string `json:"address"`
	Weight  *int64  `json:"weight"`
	// Kratos: a list of URLs; go-micro: a list of objects.
	Endpoints json.RawMessage `json:"endpoints"`
	// go-micro.
	Nodes []struct {
		Address string `json:"address"`
	} `json:"nodes"`
}

// decodeEtcdValue turns one key and its value into the addresses it
// registers, with the format it was read as. format "" detects it. An error
// means the value is not a registration of that format (or of any, when
// detecting); the caller skips the key.
func decodeEtcdValue(key string, value []byte, format string) ([]Address, string, error) {
	if format == "" {
		format = detectEtcdFormat(key, value)
		if format == "" {
			return nil, "", errors.New("not a known registration format")
		}
	}
	var (
		addrs []Address
		err   error
	)
	switch format {
	case EtcdFormatGoZero:
		addrs, err = decodeHostPort(string(bytes.TrimSpace(value)), 0)
	case EtcdFormatDubbo:
		addrs, err = decodeDubbo(key)
	default:
		addrs, err = decodeJSON(value, format)
	}
	if err != nil {
		return nil, format, err
	}
	return addrs, format, nil
}

// detectEtcdFormat guesses a key's format, or returns "".
func detectEtcdFormat(key string, value []byte) string {
	v := bytes.TrimSpace(value)
	if len(v) == 0 {
		if strings.Contains(path.Base(key), "%3A%2F%2F") || strings.Contains(key, "/providers/") {
			return EtcdFormatDubbo
		}
		return ""
	}
	if v[0] != '{' {
		return EtcdFormatGoZero
	}
	var rv registryValue
	if json.Unmarshal(v, &rv) != nil {
		return ""
	}
	switch {
	case rv.Nodes != nil:
		return EtcdFormatGoMicro
	case len(rv.Endpoints) > 0 && rv.Endpoints[0] == '[':
		return EtcdFormatKratos
	case rv.Addr != nil:
		return EtcdFormatNaming
	case rv.Address != nil:
		return EtcdFormatKitex
	}
	return ""
}

// decodeJSON decodes the JSON formats.
func decodeJSON(value []byte, format string) ([]Address, error) {
	var rv registryValue
	if err := json.Unmarshal(value, &rv); err != nil {
		return nil, fmt.Errorf("%s value: %w", format, err)
	}
	switch format {
	case EtcdFormatNaming:
		if rv.Addr == nil {
			return nil, errors.New("etcd-naming value without Addr")
		}
		if rv.Op != nil && *rv.Op != 0 {
			return nil, fmt.Errorf("etcd-naming value with Op %d, want 0 (add)", *rv.Op)
		}
		return decodeHostPort(*rv.Addr, 0)
	case EtcdFormatKitex:
		if rv.Address == nil {
			return nil, errors.New("kitex value without address")
		}
		if rv.Network != nil && *rv.Network != "tcp" && *rv.Network != "" {
			return nil, fmt.Errorf("kitex network %q, want tcp", *rv.Network)
		}
		w := int64(kitexDefaultWeight)
		if rv.Weight != nil && *rv.Weight != 0 {
			w = *rv.Weight
		}
		if w < 0 {
			return nil, fmt.Errorf("kitex weight %d is negative", w)
		}
		return decodeHostPort(*rv.Address, uint32(min(w, MaxWeight)))
	case EtcdFormatKratos:
		var eps []string
		if err := json.Unmarshal(rv.Endpoints, &eps); err != nil {
			return nil, fmt.Errorf("kratos endpoints: %w", err)
		}
		var addrs []Address
		for _, ep := range eps {
			u, err := url.Parse(ep)
			if err != nil || u.Scheme != "grpc" {
				continue // http and the like serve no gRPC
			}
			as, err := decodeHostPort(u.Host, 0)
			if err != nil {
				return nil, fmt.Errorf("kratos endpoint %q: %w", ep, err)
			}
			addrs = append(addrs, as...)
		}
		if len(addrs) == 0 {
			return nil, errors.New("kratos value without a grpc:// endpoint")
		}
		return addrs, nil
	case EtcdFormatGoMicro:
		var addrs []Address
		for _, n := range rv.Nodes {
			as, err := decodeHostPort(n.Address, 0)
			if err != nil {
				return nil, fmt.Errorf("go-micro node: %w", err)
			}
			addrs = append(addrs, as...)
		}
		if len(addrs) == 0 {
			return nil, errors.New("go-micro value without nodes")
		}
		return addrs, nil
	}
	return nil, fmt.Errorf("unknown format %q", format)
}

// decodeDubbo reads the provider URL that is the last segment of a
// dubbo-go key, such as "dubbo%3A%2F%2F10.0.0.1%3A20000%2Fcom.foo.Greeter%3F...".
func decodeDubbo(key string) ([]Address, error) {
	raw, err := url.QueryUnescape(path.Base(key))
	if err != nil {
		return nil, fmt.Errorf("dubbo provider URL: %w", err)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("dubbo provider URL: %w", err)
	}
	if u.Scheme == "" || u.Host == "" {
		return nil, fmt.Errorf("dubbo provider URL %q has no scheme://host:port", raw)
	}
	return decodeHostPort(u.Host, 0)
}

// decodeHostPort validates a registered "host:port" and returns it as one
// address. Unlike a target, a registered host may not be empty, and an
// unspecified IP (which some frameworks register by mistake) is refused.
func decodeHostPort(s string, weight uint32) ([]Address, error) {
	host, port, err := parseHostPort(s)
	if err != nil {
		return nil, fmt.Errorf("address %q: %w", s, err)
	}
	if what := unusableKind(host); what != "" {
		return nil, fmt.Errorf("address %q: %s", s, what)
	}
	return []Address{{Addr: net.JoinHostPort(host, strconv.FormatUint(uint64(port), 10)), Weight: weight}}, nil
}
