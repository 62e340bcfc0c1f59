package director_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/resolver"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// firstRand always returns 0, which makes round robin start at the first
// backend so the output is deterministic. Real code leaves Config.Rand nil.
type firstRand struct{}

func (firstRand) IntN(int) int { return 0 }

func ExampleDirector() {
	d, err := director.New(director.Config{
		Policy: director.RoundRobin,
		Logger: slog.New(slog.DiscardHandler),
		Rand:   firstRand{},
	})
	if err != nil {
		fmt.Println(err)
		return
	}

	// Before the resolver's first update there is nothing to pick.
	_, _, err = d.Pick(context.Background(), "/echo.Echo/Say")
	fmt.Println(errors.Is(err, director.ErrNoBackend))

	// A resolver normally makes this call; see resolver.Static.Run.
	if err := d.UpdateState(resolver.State{Addresses: []resolver.Address{
		{Addr: "10.0.0.1:50051"},
		{Addr: "10.0.0.2:50051"},
	}}); err != nil {
		fmt.Println(err)
		return
	}

	// The proxy picks once per stream and calls done when the stream ends.
	for i := range 3 {
		addr, done, err := d.Pick(context.Background(), "/echo.Echo/Say")
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Println("stream", i, "->", addr)
		if i == 1 {
			done(errors.New("backend returned UNAVAILABLE"))
		} else {
			done(nil)
		}
	}

	for _, b := range d.Backends() {
		fmt.Printf("%s in_flight=%d ok=%d failed=%d\n", b.Addr, b.InFlight, b.Successes, b.Failures)
	}
	// Output:
	// true
	// stream 0 -> 10.0.0.1:50051
	// stream 1 -> 10.0.0.2:50051
	// stream 2 -> 10.0.0.1:50051
	// 10.0.0.1:50051 in_flight=0 ok=2 failed=0
	// 10.0.0.2:50051 in_flight=0 ok=0 failed=1
}

func ExampleDirector_ejection() {
	d, err := director.New(director.Config{
		Logger:       slog.New(slog.DiscardHandler),
		Rand:         firstRand{},
		EjectAfter:   3,
		BaseEjection: 200 * time.Millisecond,
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	// Run decides ejections and ends them on its timer.
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- d.Run(ctx) }()
	defer func() { cancel(); <-ran }()
	if err := d.UpdateState(resolver.State{Addresses: []resolver.Address{
		{Addr: "10.0.0.1:50051"},
		{Addr: "10.0.0.2:50051"},
	}}); err != nil {
		fmt.Println(err)
		return
	}

	// 10.0.0.2 is down: the proxy ends its streams with Unavailable.
	picks := func(n int) {
		var got []string
		for range n {
			addr, done, err := d.Pick(context.Background(), "/echo.Echo/Say")
			if err != nil {
				fmt.Println(err)
				return
			}
			got = append(got, addr)
			if addr == "10.0.0.2:50051" {
				done(status.Error(codes.Unavailable, "connection refused"))
			} else {
				done(nil)
			}
		}
		fmt.Println(strings.Join(got, " "))
	}
	ejected := func() bool { return d.Backends()[1].Ejected }
	waitFor := func(cond func() bool) {
		for deadline := time.Now().Add(5 * time.Second); !cond() && time.Now().Before(deadline); {
			time.Sleep(time.Millisecond)
		}
	}
	picks(6) // the third failure in a row hands 10.0.0.2 to Run, which ejects it
	waitFor(ejected)
	picks(4) // only 10.0.0.1 while the ejection lasts
	waitFor(func() bool { return !ejected() })
	picks(2) // 10.0.0.2 is back after BaseEjection, with a fresh run count
	for _, b := range d.Backends() {
		fmt.Printf("%s ejected=%v ejections=%d\n", b.Addr, b.Ejected, b.Ejections)
	}
	// Output:
	// 10.0.0.1:50051 10.0.0.2:50051 10.0.0.1:50051 10.0.0.2:50051 10.0.0.1:50051 10.0.0.2:50051
	// 10.0.0.1:50051 10.0.0.1:50051 10.0.0.1:50051 10.0.0.1:50051
	// 10.0.0.1:50051 10.0.0.2:50051
	// 10.0.0.1:50051 ejected=false ejections=0
	// 10.0.0.2:50051 ejected=false ejections=1
}

func ExampleDirector_weightedRoundRobin() {
	d, err := director.New(director.Config{
		Policy: director.WeightedRoundRobin,
		Logger: slog.New(slog.DiscardHandler),
		Rand:   firstRand{},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	// Weights come from SRV records or "host:port;weight=N" targets.
	if err := d.UpdateState(resolver.State{Addresses: []resolver.Address{
		{Addr: "10.0.0.1:50051", Weight: 1},
		{Addr: "10.0.0.2:50051", Weight: 2},
		{Addr: "10.0.0.3:50051", Weight: 3},
	}}); err != nil {
		fmt.Println(err)
		return
	}
	// One cycle: each backend in proportion to its weight, interleaved.
	var got []string
	for range 6 {
		addr, done, err := d.Pick(context.Background(), "/echo.Echo/Say")
		if err != nil {
			fmt.Println(err)
			return
		}
		done(nil)
		got = append(got, strings.TrimPrefix(addr, "10.0.0."))
	}
	fmt.Println(strings.Join(got, " "))
	// Output:
	// 3:50051 2:50051 1:50051 3:50051 2:50051 3:50051
}

func ExampleDirector_Run() {
	d, err := director.New(director.Config{
		Policy:              director.PeakEWMA,
		SlowStart:           30 * time.Second,
		HealthCheckInterval: 5 * time.Second,
		// Usually the resolver's coalescing trigger.
		ResolveNow: func() {},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	// main runs every component under one context, cancelled on SIGTERM,
	// and waits for each Run to return.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- d.Run(ctx) }()

	// ... a resolver calls d.UpdateState, the proxy calls d.Pick ...

	cancel()
	if err := <-errc; err != nil {
		fmt.Println(err)
	}
}
