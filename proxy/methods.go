package proxy

import (
	"fmt"
	"strings"
)

// normalizeMethods returns the method names of Config.RetryOn in the one
// form Upstream.retryable matches: "/pkg.Service/Method" for a method and
// "/pkg.Service/" for every method of a service. It accepts the spellings
// users write: with or without the leading slash (grpcurl and ghz's
// --call write "pkg.Service/Method"), and a service with or without the
// trailing slash. Anything else is an error naming the entry, so that a
// typo is not silently a retry policy that never applies. It returns a
// new slice.
func normalizeMethods(names []string) ([]string, error) {
	out := make([]string, 0, len(names))
	for _, raw := range names {
		name := strings.TrimPrefix(strings.TrimSpace(raw), "/")
		service, method, hasMethod := strings.Cut(name, "/")
		if !validIdent(service, true) || (hasMethod && method != "" && !validIdent(method, false)) {
			return nil, fmt.Errorf("proxy: retry-on %q: want /package.Service/Method or /package.Service/", raw)
		}
		if hasMethod && method != "" {
			out = append(out, "/"+service+"/"+method)
		} else {
			out = append(out, "/"+service+"/")
		}
	}
	return out, nil
}

// validIdent reports whether s is a protobuf identifier, or with dotted a
// dot-separated full name such as "grpc.testing.TestService".
func validIdent(s string, dotted bool) bool {
	if s == "" {
		return false
	}
	parts := []string{s}
	if dotted {
		parts = strings.Split(s, ".")
	}
	for _, p := range parts {
		if p == "" {
			return false
		}
		for i, r := range p {
			switch {
			case r == '_' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z':
			case r >= '0' && r <= '9' && i > 0:
			default:
				return false
			}
		}
	}
	return true
}
