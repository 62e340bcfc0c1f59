package resolver

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/streamlb/streamlb/internal/zktest"
)

// TestAttackR3ZKManyChildrenChurn: 2,000 Kitex children created in four
// multi-requests, a child created and deleted 300 times in a row while
// they stay, then all of them deleted in four more: the set follows each
// step (the churned child is not left behind), within a bound.
func TestAttackR3ZKManyChildrenChurn(t *testing.T) {
	srv := zktest.Start(t)
	c := newZKClient(t, srv.Addr(), 20*zktest.TickTime)
	c.create("/churn/svc/10.200.0.1:1", `{"Weight":10}`, 0)
	u := newRecUpdater()
	startZKResolver(t, "zk://"+srv.Addr()+"/churn/svc", u)
	u.waitSet(testContext(t), t, "10.200.0.1:1;weight=10")

	const n = 2000
	name := func(i int) string { return fmt.Sprintf("/churn/svc/10.201.%d.%d:9000", i>>8, byte(i)) }
	batch := func(op func(i int) any) {
		for lo := 0; lo < n; lo += 500 {
			var ops []any
			for i := lo; i < lo+500; i++ {
				ops = append(ops, op(i))
			}
			if _, err := c.conn.Multi(ops...); err != nil {
				t.Fatalf("multi: %v", err)
			}
		}
	}
	size := func() int {
		states, _ := u.snapshot()
		return len(states[len(states)-1].Addresses)
	}
	start := time.Now()
	batch(func(i int) any {
		return &zk.CreateRequest{Path: name(i), Data: []byte(`{"Weight":10}`), Acl: zk.WorldACL(zk.PermAll)}
	})
	u.waitFor(within(t, 20*time.Second), t, fmt.Sprint(n+1, " backends"), func() bool { return size() == n+1 })
	t.Logf("%d children → set of %d: %v", n, n+1, time.Since(start).Round(time.Millisecond))

	start = time.Now()
	for range 300 {
		c.create("/churn/svc/10.202.0.1:1", `{"Weight":10}`, zk.FlagEphemeral)
		c.delete("/churn/svc/10.202.0.1:1")
	}
	c.create("/churn/svc/10.202.0.2:1", `{"Weight":10}`, zk.FlagEphemeral)
	// A list that sees the marker, created after the churned child's last
	// delete, cannot see that child.
	has := func(addr string) bool {
		states, _ := u.snapshot()
		return slices.ContainsFunc(states[len(states)-1].Addresses, func(a Address) bool { return a.Addr == addr })
	}
	u.waitFor(within(t, 20*time.Second), t, "the marker child", func() bool { return has("10.202.0.2:1") })
	if has("10.202.0.1:1") || size() != n+2 {
		t.Errorf("set of %d with the churned child %v after its last delete, want %d without it", size(), has("10.202.0.1:1"), n+2)
	}
	states, _ := u.snapshot()
	t.Logf("300 create/delete pairs followed in %v, %d sets pushed in all", time.Since(start).Round(time.Millisecond), len(states))

	start = time.Now()
	batch(func(i int) any { return &zk.DeleteRequest{Path: name(i), Version: -1} })
	u.waitSet(within(t, 20*time.Second), t, "10.200.0.1:1;weight=10", "10.202.0.2:1;weight=10")
	t.Logf("%d deletions → set: %v", n, time.Since(start).Round(time.Millisecond))
}
