package testserver_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/testserver"
)

// A backend is started on a loopback port, called, and identified by the
// x-backend response header; request metadata makes a call fail.
func Example() {
	srv, err := testserver.New(testserver.Config{
		Name:   "backend-a",
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := srv.Start("127.0.0.1:0"); err != nil {
		log.Fatal(err)
	}
	defer srv.Stop()

	cc, err := grpc.NewClient(srv.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer cc.Close()
	client := testgrpc.NewTestServiceClient(cc)
	ctx := context.Background()

	var header metadata.MD
	resp, err := client.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 3}, grpc.Header(&header))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(testserver.BackendFromHeader(header), len(resp.GetPayload().GetBody()))

	failCtx := metadata.AppendToOutgoingContext(ctx,
		testserver.MetadataFailCode, "8", testserver.MetadataFailMessage, "slow down")
	_, err = client.EmptyCall(failCtx, &testgrpc.Empty{})
	fmt.Println(status.Code(err), status.Convert(err).Message())
	fmt.Println(srv.Calls(), srv.MethodCalls(testgrpc.TestService_UnaryCall_FullMethodName))
	// Output:
	// backend-a 3
	// ResourceExhausted slow down
	// 2 1
}
