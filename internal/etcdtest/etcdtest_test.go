package etcdtest

import (
	"net"
	"net/url"
	"testing"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestStartReplacesTakenPort: a port picked free and then taken by
// someone else before the first start (a busy machine's outgoing
// connections share the range) is replaced by a new one, where the start
// used to fail after 5 s of retries with "address already in use".
func TestStartReplacesTakenPort(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	s := &Server{
		t:         t,
		dir:       t.TempDir(),
		clientURL: url.URL{Scheme: "http", Host: taken.Addr().String()},
		peerURL:   url.URL{Scheme: "http", Host: testkit.FreeAddr(t)},
	}
	s.Start()
	t.Cleanup(s.Stop)
	if s.Endpoint() == taken.Addr().String() {
		t.Fatalf("serving on %s, which another listener holds", s.Endpoint())
	}
	if _, err := s.Client().Put(t.Context(), "k", "v"); err != nil {
		t.Errorf("put on the server started on a new port: %v", err)
	}
}
