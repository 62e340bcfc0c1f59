package resolver

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// Node formats of a ZooKeeper target, the "?format=" values of
// "zk://.../PATH?format=F". Each child of PATH is one registration; without
// ?format= each child's format is detected from its name and data. The
// decoding is shared with the etcd formats of the same frameworks.
const (
	// ZKFormatKitex is kitex-contrib/registry-zookeeper: children
	// "/<service>/<ip:port>", data {"Weight":10,"Tags":{...}}. The weight
	// becomes [Address.Weight]; 0 or no data is Kitex's default, 10.
	ZKFormatKitex = EtcdFormatKitex
	// ZKFormatDubbo is dubbo-go's ZooKeeper registry: children
	// "/dubbo/<interface>/providers/<URL-escaped provider URL>"; the
	// address is the provider URL's host:port and the data is ignored.
	ZKFormatDubbo = EtcdFormatDubbo
	// ZKFormatKratos is Kratos's ZooKeeper registry: children
	// "/microservices/<name>/<id>" whose data is the same JSON as on etcd
	// ([EtcdFormatKratos]); the grpc:// endpoints are used.
	ZKFormatKratos = EtcdFormatKratos
)

// ZKFormats returns the node formats a ZooKeeper target may name with
// "?format=".
func ZKFormats() []string {
	return []string{ZKFormatKitex, ZKFormatDubbo, ZKFormatKratos}
}

// parseZKFormat validates a "?format=" value; "auto" and "" mean detection
// and come back as "".
func parseZKFormat(s string) (string, error) {
	f := strings.ToLower(s)
	if f == "" || f == "auto" {
		return "", nil
	}
	for _, known := range ZKFormats() {
		if f == known {
			return f, nil
		}
	}
	return "", fmt.Errorf("unknown format %q (want auto, %s)", s, strings.Join(ZKFormats(), ", "))
}

// decodeZKNode turns one child (its full path, its name and its data) into
// the addresses it registers, with the format it was read as. format ""
// detects it. An error means the child is not a registration of that
// format (or of any, when detecting); the caller skips it.
func decodeZKNode(nodePath, name string, data []byte, format string) ([]Address, string, error) {
	if format == "" {
		format = detectZKFormat(name, data)
		if format == "" {
			return nil, "", errors.New("not a known registration format")
		}
	}
	var (
		addrs []Address
		err   error
	)
	switch format {
	case ZKFormatDubbo:
		addrs, err = decodeDubbo(nodePath)
	case ZKFormatKratos:
		addrs, err = decodeJSON(data, EtcdFormatKratos)
	case ZKFormatKitex:
		addrs, err = decodeZKKitex(name, data)
	default:
		err = fmt.Errorf("unknown format %q", format)
	}
	if err != nil {
		return nil, format, err
	}
	return addrs, format, nil
}

// detectZKFormat guesses a child's format, or returns "".
func detectZKFormat(name string, data []byte) string {
	// dubbo-go's name is a whole provider URL; the data varies (empty, or
	// an IP written by Curator-based providers), so the name decides.
	if raw, err := url.QueryUnescape(name); err == nil && strings.Contains(raw, "://") {
		return ZKFormatDubbo
	}
	v := bytes.TrimSpace(data)
	if len(v) > 0 && v[0] == '{' {
		var rv registryValue
		if json.Unmarshal(v, &rv) == nil && len(rv.Endpoints) > 0 && rv.Endpoints[0] == '[' {
			return ZKFormatKratos
		}
	}
	if _, _, err := parseHostPort(name); err == nil {
		return ZKFormatKitex
	}
	return ""
}

// decodeZKKitex reads a Kitex child: the name is "ip:port", the data the
// instance's {"Weight":N,"Tags":{...}} (Go's JSON matches "Weight" to the
// etcd format's "weight" field, as names match case-insensitively).
func decodeZKKitex(name string, data []byte) ([]Address, error) {
	w := int64(kitexDefaultWeight)
	if v := bytes.TrimSpace(data); len(v) > 0 {
		var rv registryValue
		if err := json.Unmarshal(v, &rv); err != nil {
			return nil, fmt.Errorf("kitex data: %w", err)
		}
		if rv.Weight != nil && *rv.Weight != 0 {
			w = *rv.Weight
		}
	}
	if w < 0 {
		return nil, fmt.Errorf("kitex weight %d is negative", w)
	}
	return decodeHostPort(name, uint32(min(w, MaxWeight)))
}
