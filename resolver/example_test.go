package resolver_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/resolver"
	"github.com/streamlb/streamlb/testserver"
)

func ExampleParseTarget() {
	for _, s := range []string{
		"10.0.0.1:8080;weight=3",
		"[2001:DB8::1]:443",
		"dns://8.8.8.8:53/backend.svc:50051",
		"dns+srv:///_grpc._tcp.backend.svc",
		"backend.svc",
	} {
		t, err := resolver.ParseTarget(s)
		if err != nil {
			fmt.Println(err)
			continue
		}
		fmt.Printf("scheme=%q authority=%q host=%q port=%d weight=%d -> %s\n",
			t.Scheme, t.Authority, t.Host, t.Port, t.Weight, t)
	}
	// Output:
	// scheme="" authority="" host="10.0.0.1" port=8080 weight=3 -> 10.0.0.1:8080;weight=3
	// scheme="" authority="" host="2001:db8::1" port=443 weight=0 -> [2001:db8::1]:443
	// scheme="dns" authority="8.8.8.8:53" host="backend.svc" port=50051 weight=0 -> dns://8.8.8.8:53/backend.svc:50051
	// scheme="dns+srv" authority="" host="_grpc._tcp.backend.svc" port=0 weight=0 -> dns+srv:///_grpc._tcp.backend.svc
	// resolver: target "backend.svc": missing port
}

func ExampleNewStatic() {
	s, err := resolver.NewStatic([]string{"10.0.0.2:80", "10.0.0.1:80;weight=2"})
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, a := range s.State().Addresses {
		fmt.Println(a.Addr, a.Weight)
	}

	_, err = resolver.NewStatic([]string{"10.0.0.1:80", "10.0.0.1:080"})
	fmt.Println(err)
	// Output:
	// 10.0.0.1:80 2
	// 10.0.0.2:80 0
	// resolver: duplicate target "10.0.0.1:080" (already given as "10.0.0.1:80")
}

// A plain grpc-go client balances over the pods of a headless service and
// keeps following its DNS records. Here a testserver.DNSServer stands in
// for cluster DNS, and three backends listen on the same port of
// 127.0.0.1, 127.0.0.2 and 127.0.0.3, as pods do on their own IPs.
func ExampleNewBuilder() {
	quiet := slog.New(slog.DiscardHandler)
	clusterDNS := testserver.NewDNSServer(testserver.DNSConfig{Logger: quiet})
	if err := clusterDNS.Start("127.0.0.1:0"); err != nil {
		log.Fatal(err)
	}
	defer clusterDNS.Stop()

	pods, port, err := startPods(quiet, "pod-a", "pod-b", "pod-c")
	if err != nil {
		log.Fatal(err)
	}
	defer func() {
		for _, p := range pods {
			p.Stop()
		}
	}()
	clusterDNS.SetA("web.default.svc.cluster.local", "127.0.0.1", "127.0.0.2", "127.0.0.3")

	b := resolver.NewBuilder(resolver.DNSOptions{Refresh: time.Second, Logger: quiet})
	target := fmt.Sprintf("streamlb-dns://%s/web.default.svc.cluster.local:%d", clusterDNS.Addr(), port)
	cc, err := grpc.NewClient(target,
		grpc.WithResolvers(b),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer cc.Close()
	client := testgrpc.NewTestServiceClient(cc)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	seen := map[string]bool{}
	for len(seen) < len(pods) && ctx.Err() == nil {
		var header metadata.MD
		if _, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.Header(&header)); err != nil {
			log.Fatal(err)
		}
		seen[testserver.BackendFromHeader(header)] = true
	}
	fmt.Println("backends seen:", slices.Sorted(maps.Keys(seen)))
	// Output:
	// backends seen: [pod-a pod-b pod-c]
}

// startPods starts one testserver per name on 127.0.0.1, 127.0.0.2, …, all
// on the same port, and returns them with the port.
func startPods(logger *slog.Logger, names ...string) ([]*testserver.Server, int, error) {
	var lastErr error
	for range 5 { // another process may hold the port on one address
		var pods []*testserver.Server
		port := 0
		for i, name := range names {
			s, err := testserver.New(testserver.Config{Name: name, Logger: logger})
			if err != nil {
				return nil, 0, err
			}
			if err = s.Start(net.JoinHostPort(fmt.Sprintf("127.0.0.%d", i+1), strconv.Itoa(port))); err != nil {
				lastErr = err
				break
			}
			pods = append(pods, s)
			if port == 0 {
				_, p, _ := net.SplitHostPort(s.Addr())
				port, _ = strconv.Atoi(p)
			}
		}
		if len(pods) == len(names) {
			return pods, port, nil
		}
		for _, p := range pods {
			p.Stop()
		}
	}
	return nil, 0, lastErr
}
