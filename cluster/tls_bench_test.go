//go:build unix

package cluster_test

import (
	"crypto/tls"
	"syscall"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/cluster"
)

// BenchmarkTLSUnary compares small unary calls through the frame engine
// over h2c and over TLS, one client connection, and reports the CPU time
// per call of the whole process (client, proxy and backend: with TLS the
// client encrypts too, so the difference is about twice the proxy's own):
//
//	go test -run '^$' -bench TLSUnary -benchtime 5000x ./cluster
func BenchmarkTLSUnary(b *testing.B) {
	ca := newCA(b, "ca")
	st := serverFiles(b, ca)
	ts := startBackend(b, "a", "127.0.0.1:0")
	for _, on := range []bool{false, true} {
		name := "h2c"
		if on {
			name = "tls"
		}
		b.Run(name, func(b *testing.B) {
			cfg := cluster.ServerConfig{Cluster: cluster.Config{Targets: []string{ts.Addr()}}}
			if on {
				cfg.TLS = &st
			}
			r := runServer(b, cfg)
			client := dial(b, r.addr)
			if on {
				client = dialTLS(b, r.addr, &tls.Config{RootCAs: ca.pool()})
			}
			ctx := b.Context()
			req := &testgrpc.SimpleRequest{ResponseSize: 100, Payload: &testgrpc.Payload{Body: make([]byte, 100)}}
			if _, err := client.UnaryCall(ctx, req); err != nil { // connect outside the timing
				b.Fatal(err)
			}
			start := cpuTime()
			b.ResetTimer()
			for range b.N {
				if _, err := client.UnaryCall(ctx, req); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
		})
	}
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
