package cluster_test

import (
	"context"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/zktest"
	"github.com/streamlb/streamlb/testserver"
)

// TestZKRegistrationEndToEnd runs the proxy on a zk:// target of a real
// ZooKeeper while testservers register with ephemeral nodes, deregister
// and die, with calls flowing the whole time.
//
// ZooKeeper says nothing when it expires the session, so the last call on
// the killed backend is bounded from the moment it stopped: within the 2s
// session timeout and a second.
func TestZKRegistrationEndToEnd(t *testing.T) {
	zks := zktest.Start(t)
	registryStory{
		target:   "zk://" + zks.Addr() + "/kitex/echo",
		register: testserver.RegisterZK,
		ttl:      4 * time.Second,
		gone: func(_ context.Context, _ *testing.T, reg *testserver.Registration) time.Time {
			reg.Abandon()
			return time.Now()
		},
		within: 3 * time.Second,
	}.run(t)
}
