package cluster_test

import (
	"strings"
	"testing"

	"github.com/streamlb/streamlb/cluster"
)

// TestAttackR4RetryBudgetOutOfRange: a retry budget ratio that is not a
// finite number, or a budget whose thousandths overflow an int64, is
// refused. Before, all were accepted, and each turned retries off instead:
// the proxy keeps tokens in thousandths as int64, int64(NaN*1000) and
// int64(+Inf) are math.MinInt64 on amd64, so the first successful call
// emptied the bucket for good, and a budget of 1e16 made its size
// negative, so no retry was ever allowed.
func TestAttackR4RetryBudgetOutOfRange(t *testing.T) {
	for _, c := range []struct{ proxy, retry, field string }{
		{proxy: "retry_budget_ratio: .nan", field: "proxy"},
		{proxy: "retry_budget_ratio: .inf", field: "proxy"},
		{proxy: "retry_budget: 10000000000000000", field: "proxy"},
		{retry: "budget_ratio: .nan", field: "clusters[0]"},
		{retry: "budget_ratio: .inf", field: "clusters[0]"},
		{retry: "budget: 10000000000000000", field: "clusters[0]"},
	} {
		text := "proxy: {" + c.proxy + "}\nclusters:\n  - {name: a, targets: [127.0.0.1:9001], retry: {" + c.retry + "}}\nroutes:\n  - {cluster: a}\n"
		_, err := cluster.ParseFile("budget.yaml", []byte(text))
		if err == nil || !strings.Contains(err.Error(), c.field) {
			t.Errorf("%s%s: ParseFile = %v, want an error at %s", c.proxy, c.retry, err, c.field)
		}
	}
}
