package cluster_test

import (
	"strings"
	"testing"

	"github.com/streamlb/streamlb/cluster"
)

// TestAttackR4RateLimitNotANumber: rate_limit.rate must be a finite
// number of calls per second. YAML's .nan passed the "must be positive"
// check (NaN <= 0 is false), and the bucket then admitted every call: a
// NaN rate made the token count NaN, and NaN < 1 is false too. .inf gave a
// default burst of int(+Inf), undefined (1 on amd64).
func TestAttackR4RateLimitNotANumber(t *testing.T) {
	for _, rate := range []string{".nan", ".NaN", ".inf", "+.inf"} {
		text := "clusters:\n  - {name: a, targets: [127.0.0.1:9001]}\nroutes:\n  - {name: r, cluster: a, rate_limit: {rate: " + rate + "}}\n"
		_, err := cluster.ParseFile("nan.yaml", []byte(text))
		if err == nil || !strings.Contains(err.Error(), "routes[0].rate_limit.rate") {
			t.Errorf("rate %s: ParseFile = %v, want an error at routes[0].rate_limit.rate", rate, err)
		}
	}
}

// TestRateLimitBurstBounded: burst is at most 2^31-1, as the README says;
// a larger one was accepted.
func TestRateLimitBurstBounded(t *testing.T) {
	for burst, ok := range map[string]bool{"2147483647": true, "2147483648": false, "9223372036854775807": false} {
		text := "clusters:\n  - {name: a, targets: [127.0.0.1:9001]}\nroutes:\n  - {name: r, cluster: a, rate_limit: {rate: 10, burst: " + burst + "}}\n"
		_, err := cluster.ParseFile("burst.yaml", []byte(text))
		if ok && err != nil {
			t.Errorf("burst %s: ParseFile = %v, want it accepted", burst, err)
		}
		if !ok && (err == nil || !strings.Contains(err.Error(), "routes[0].rate_limit.burst")) {
			t.Errorf("burst %s: ParseFile = %v, want an error at routes[0].rate_limit.burst", burst, err)
		}
	}
}
