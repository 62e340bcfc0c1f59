package cluster_test

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/streamlb/streamlb/internal/etcdtest"
	"github.com/streamlb/streamlb/testserver"
)

// TestEtcdRegistrationEndToEnd runs the registry story on an etcd://
// target: the killed backend's lease lapses and etcd deletes its key; its
// last call comes within a second of that.
func TestEtcdRegistrationEndToEnd(t *testing.T) {
	etcd := etcdtest.Start(t)
	cli := etcd.Client()
	registryStory{
		target:   "etcd://" + etcd.Endpoint() + "/kitex/registry-etcd/echo",
		register: testserver.RegisterEtcd,
		ttl:      10 * time.Second,
		gone: func(ctx context.Context, t *testing.T, reg *testserver.Registration) time.Time {
			wch := cli.Watch(ctx, reg.Key())
			reg.Abandon()
			for resp := range wch {
				if len(resp.Events) > 0 && resp.Events[0].Type == clientv3.EventTypeDelete {
					return time.Now()
				}
			}
			t.Fatal("the abandoned key was never deleted")
			return time.Time{}
		},
		within: time.Second,
	}.run(t)
}
