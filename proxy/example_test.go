package proxy_test

import (
	"context"
	"fmt"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/testserver"
)

// ExampleServer puts the frame engine in front of one backend, with a
// Picker that always chooses it. In streamlb, director.Director is the
// Picker.
func ExampleServer() {
	backend, _ := testserver.New(testserver.Config{Name: "pod-a", Logger: quietLog})
	backend.Start("127.0.0.1:0")
	defer backend.Stop()

	srv, err := proxy.New(proxy.Config{
		Picker: proxy.PickerFunc(func(ctx context.Context, method string) (string, func(error), error) {
			return backend.Addr(), nil, nil
		}),
		Logger: quietLog,
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(ln)

	cc, _ := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	resp, err := testgrpc.NewTestServiceClient(cc).UnaryCall(context.Background(), &testgrpc.SimpleRequest{})
	fmt.Println(resp.GetHostname(), err)
	cc.Close()

	// Shutdown sends GOAWAY and waits for calls in flight.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fmt.Println(srv.Shutdown(ctx))
	// Output:
	// pod-a <nil>
	// <nil>
}
