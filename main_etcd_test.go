//go:build !proxyonly

package main

import (
	"net"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestSplitBackendsKeepsEtcdEndpoints(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   []string
		want []string
	}{
		{name: "plain list", in: []string{"a:1, b:2,,", "c:3"}, want: []string{"a:1", "b:2", "c:3"}},
		{name: "etcd endpoints", in: []string{"etcd://h1:2379,h2:2379,h3:2379/svc"}, want: []string{"etcd://h1:2379,h2:2379,h3:2379/svc"}},
		{name: "etcd in a list", in: []string{"a:1,etcd://h1:2379,h2:2379/svc,dns:///b:2,c:3"}, want: []string{"a:1", "etcd://h1:2379,h2:2379/svc", "dns:///b:2", "c:3"}},
		{name: "unterminated", in: []string{"etcd://h1:1,h2:2"}, want: []string{"etcd://h1:1,h2:2"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if diff := cmp.Diff(tc.want, splitBackends(tc.in)); diff != "" {
				t.Errorf("splitBackends(%q) mismatch (-want +got):\n%s", tc.in, diff)
			}
		})
	}
}

func TestRegisterAddr(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{"0.0.0.0:9090": "127.0.0.1:9090", "[::]:9090": "127.0.0.1:9090", "127.0.0.2:1": "127.0.0.2:1"} {
		a, err := net.ResolveTCPAddr("tcp", in)
		if err != nil {
			t.Fatal(err)
		}
		if got := registerAddr(a); got != want {
			t.Errorf("registerAddr(%s) = %s, want %s", in, got, want)
		}
	}
}
