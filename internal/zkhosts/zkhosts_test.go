package zkhosts_test

import (
	"context"
	"log/slog"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/internal/zkhosts"
	"github.com/streamlb/streamlb/testserver"
)

// Compile-time check that Provider is go-zookeeper's HostProvider.
var _ zk.HostProvider = (*zkhosts.Provider)(nil)

// startDNSServer starts a real DNS server on loopback for the test.
func startDNSServer(t *testing.T, cfg testserver.DNSConfig) *testserver.DNSServer {
	t.Helper()
	cfg.Logger = slog.New(slog.DiscardHandler)
	s := testserver.NewDNSServer(cfg)
	if err := s.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// dnsLookupVia returns a LookupHost that asks the DNS server at addr only,
// over the network (Go's resolver, which caches nothing).
func dnsLookupVia(addr string) func(ctx context.Context, host string) ([]string, error) {
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}
	return r.LookupHost
}

// nextStep is one Next call's answer.
type nextStep struct {
	server     string
	retryStart bool
}

// nexts calls Next n times.
func nexts(h zk.HostProvider, n int) []nextStep {
	var out []nextStep
	for range n {
		s, r := h.Next()
		out = append(out, nextStep{s, r})
	}
	return out
}

// TestZKHostsFollowsDNS runs the ZooKeeper host provider against a real
// DNS server: a server given by name is looked up when the client starts,
// and again each time the client has tried every address without a
// session (retryStart), so a name that moved is found at its new address
// (go-zookeeper's DNSHostProvider looked it up once and tried the old
// address for ever). A lookup that fails keeps the addresses known; IP
// literals are never looked up.
func TestZKHostsFollowsDNS(t *testing.T) {
	t.Parallel()
	dns := startDNSServer(t, testserver.DNSConfig{DefaultTTL: 1})
	const name = "zk-0.zk.test.svc.cluster.local"
	dns.SetA(name, "127.0.0.2")
	ctx := testkit.Context(t, 30*time.Second)
	h := zkhosts.New(ctx, dnsLookupVia(dns.Addr()))
	h.InOrder()

	if err := h.Init([]string{name + ":2181", "10.9.9.9:2181"}); err != nil {
		t.Fatal(err)
	}
	want := []nextStep{{"127.0.0.2:2181", false}, {"10.9.9.9:2181", false}}
	if got := nexts(h, 2); !slices.Equal(got, want) {
		t.Fatalf("first round = %v, want %v", got, want)
	}

	// The name moves while the client tries the addresses it knows: the
	// round's end looks it up again.
	dns.SetA(name, "127.0.0.3")
	want = []nextStep{{"127.0.0.3:2181", true}, {"10.9.9.9:2181", false}, {"127.0.0.3:2181", true}}
	if got := nexts(h, 3); !slices.Equal(got, want) {
		t.Fatalf("rounds after the move = %v, want %v", got, want)
	}

	// A session on the IP literal; that connection lost, the new round
	// starts after it and ends on it, looking the name up once more.
	h.Next()
	h.Connected() // on 10.9.9.9:2181
	dns.SetA(name, "127.0.0.4", "127.0.0.5")
	want = []nextStep{{"127.0.0.3:2181", false}, {"127.0.0.4:2181", true}, {"127.0.0.5:2181", false}, {"10.9.9.9:2181", false}}
	if got := nexts(h, 4); !slices.Equal(got, want) {
		t.Fatalf("rounds after a lost session = %v, want %v", got, want)
	}

	// A name that no longer resolves keeps the addresses it had.
	dns.Remove(name)
	want = []nextStep{{"127.0.0.4:2181", true}, {"127.0.0.5:2181", false}, {"10.9.9.9:2181", false}}
	if got := nexts(h, 3); !slices.Equal(got, want) {
		t.Fatalf("rounds with the name gone = %v, want %v", got, want)
	}
}

// TestZKHostsInit: Init fails when no server has an address (zk.Connect
// then fails and Run tries again after its backoff), and leaves out a name
// that does not resolve beside servers that do.
func TestZKHostsInit(t *testing.T) {
	t.Parallel()
	dns := startDNSServer(t, testserver.DNSConfig{DefaultTTL: 1})
	dns.SetA("zk-0.test", "127.0.0.2")
	ctx := testkit.Context(t, 30*time.Second)
	for _, tc := range []struct {
		name    string
		servers []string
		want    []string // addresses; nil: Init fails
	}{
		{name: "name", servers: []string{"zk-0.test:2181"}, want: []string{"127.0.0.2:2181"}},
		{name: "unknown name", servers: []string{"zk-9.test:2181"}},
		{name: "known and unknown name", servers: []string{"zk-9.test:2181", "zk-0.test:2182"}, want: []string{"127.0.0.2:2182"}},
		{name: "IP literals", servers: []string{"127.0.0.7:2181", "[::1]:2181"}, want: []string{"127.0.0.7:2181", "[::1]:2181"}},
		{name: "no port", servers: []string{"zk-0.test"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := zkhosts.New(ctx, dnsLookupVia(dns.Addr()))
			h.InOrder()
			err := h.Init(tc.servers)
			if tc.want == nil {
				if err == nil {
					t.Errorf("Init(%q) = nil, want an error", tc.servers)
				}
				return
			}
			if err != nil {
				t.Fatalf("Init(%q) = %v", tc.servers, err)
			}
			var got []string
			for _, s := range nexts(h, len(tc.want)) {
				got = append(got, s.server)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("addresses = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestZKHostsIPLiteralsAsBefore: for servers given as IP literals the
// provider answers as go-zookeeper's DNSHostProvider does, with and
// without sessions between, and asks DNS nothing.
func TestZKHostsIPLiteralsAsBefore(t *testing.T) {
	t.Parallel()
	dns := startDNSServer(t, testserver.DNSConfig{DefaultTTL: 1})
	ctx := testkit.Context(t, 30*time.Second)
	ours := zkhosts.New(ctx, dnsLookupVia(dns.Addr()))
	theirs := zk.NewDNSHostProvider()
	servers := []string{"127.0.0.9:2181"}
	for _, h := range []zk.HostProvider{ours, theirs} {
		if err := h.Init(servers); err != nil {
			t.Fatal(err)
		}
	}
	for i, connect := range []bool{false, false, true, false, false, true, true, false} {
		s1, r1 := ours.Next()
		s2, r2 := theirs.Next()
		if s1 != s2 || r1 != r2 {
			t.Fatalf("Next %d = %s, %v; go-zookeeper's provider says %s, %v", i, s1, r1, s2, r2)
		}
		if connect {
			ours.Connected()
			theirs.Connected()
		}
	}
	if n := dns.Queries(); n != 0 {
		t.Errorf("%d DNS queries, want none for IP literals", n)
	}
}
