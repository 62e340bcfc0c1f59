package resolver_test

import (
	"fmt"

	"github.com/streamlb/streamlb/resolver"
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
