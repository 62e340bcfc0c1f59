package resolver

import (
	"encoding/json"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/etcdtest"
)

// TestAttackR3EtcdOneKeyManyEndpoints: a single Kratos registration whose
// endpoints list holds 30,000 grpc:// endpoints (a 900 KiB value, under
// etcd's 1.5 MiB request limit) made a set of 30,000 backends from one
// key. Like a DNS answer, a registry's set must be bounded
// (MaxAddresses); over the bound the last set is kept and the error names
// the count and the limit. A good key beside it keeps the set it had.
func TestAttackR3EtcdOneKeyManyEndpoints(t *testing.T) {
	t.Parallel()
	const maxSet = 10000 // MaxAddresses
	srv := etcdtest.Start(t)
	cli := srv.Client()
	ctx := testContext(t)
	srv.Put(cli, "/microservices/big/good", `{"id":"good","name":"big","endpoints":["grpc://10.9.0.1:9000"]}`)

	u := newRecUpdater()
	startEtcdResolver(t, "etcd://"+srv.Endpoint()+"//microservices/big", EtcdOptions{}, u)
	u.waitSet(ctx, t, "10.9.0.1:9000")

	eps := make([]string, 30000)
	for i := range eps {
		eps[i] = fmt.Sprintf("grpc://10.%d.%d.%d:9000", 10+i>>16, byte(i>>8), byte(i))
	}
	v, err := json.Marshal(map[string]any{"id": "huge", "name": "big", "endpoints": eps})
	if err != nil {
		t.Fatal(err)
	}
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	srv.Put(cli, "/microservices/big/huge", string(v))
	u.waitFor(within(t, 10*time.Second), t, "a new set or an error", func() bool {
		states, errs := u.snapshot()
		return len(states) > 1 || len(errs) > 0
	})
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	states, errs := u.snapshot()
	got := len(states[len(states)-1].Addresses)
	t.Logf("value of %d KiB: last set %d backends, %d errors, %.1f MiB allocated", len(v)>>10, got, len(errs), float64(after.TotalAlloc-before.TotalAlloc)/(1<<20))
	if got > maxSet {
		t.Errorf("one key made a set of %d backends, want at most %d", got, maxSet)
	}
	if len(errs) == 0 || !strings.Contains(errs[0].Error(), fmt.Sprint(maxSet)) {
		t.Errorf("errors = %v, want one naming the limit %d", errs, maxSet)
	}
}
