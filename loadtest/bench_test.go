package loadtest_test

import (
	"context"
	"encoding/base64"
	"fmt"
	"testing"
	"time"

	"github.com/bojand/ghz/runner"

	"github.com/streamlb/streamlb/loadtest"
	"github.com/streamlb/streamlb/testserver"
)

// BenchmarkUnary compares loadtest.Run with plain ghz (the library, as the
// ghz command-line tool uses it, without the backend attribution) on the same
// in-process testserver: one connection, concurrency 50, 100-byte unary
// calls. One op is one call, so run it with a fixed count, e.g.
//
//	go test -run '^$' -bench Unary -benchtime 20000x ./loadtest/
//
// and compare the calls/s metrics. loadtest/bench/ghzcompare.sh compares
// with the ghz command-line tool over separate processes instead.
func BenchmarkUnary(b *testing.B) {
	ts, err := testserver.New(testserver.Config{Name: "solo", Logger: quietLog})
	if err != nil {
		b.Fatal(err)
	}
	if err := ts.Start("127.0.0.1:0"); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(ts.Stop)
	body := base64.StdEncoding.EncodeToString(testserver.PayloadBody(100))
	data := fmt.Sprintf(`{"payload":{"body":%q},"response_size":100}`, body)
	const call = "grpc.testing.TestService/UnaryCall"

	b.Run("ghz", func(b *testing.B) {
		rep, err := runner.Run(call, ts.Addr(),
			runner.WithInsecure(true),
			runner.WithConcurrency(50),
			runner.WithConnections(1),
			runner.WithTotalRequests(uint(b.N)),
			runner.WithDataFromJSON(data),
			runner.WithTimeout(20*time.Second),
		)
		if err != nil {
			b.Fatal(err)
		}
		if len(rep.ErrorDist) > 0 {
			b.Fatalf("errors: %v", rep.ErrorDist)
		}
		b.ReportMetric(rep.Rps, "calls/s")
	})
	b.Run("loadtest", func(b *testing.B) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		res, err := loadtest.Run(ctx, loadtest.Config{
			Target: ts.Addr(), Call: call, Data: []byte(data),
			Total: b.N, Concurrency: 50, Connections: 1,
		}, nil)
		if err != nil {
			b.Fatal(err)
		}
		if res.Errors > 0 {
			b.Fatalf("errors: %v", res.ErrorMessages)
		}
		b.ReportMetric(res.RPS, "calls/s")
	})
}
