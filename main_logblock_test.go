package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/testserver"
)

// stuckWriter passes Writes to w until stick is called; from then on
// every Write blocks until unstick, as a stderr pipe nobody reads does.
type stuckWriter struct {
	w        io.Writer
	stuck    atomic.Bool
	released chan struct{}
	once     sync.Once
}

func (s *stuckWriter) Write(p []byte) (int, error) {
	if s.stuck.Load() {
		<-s.released
	}
	return s.w.Write(p)
}

func (s *stuckWriter) unstick() { s.once.Do(func() { close(s.released) }) }

// TestProxyBlockedLogWriter: the proxy command's stderr stops taking
// lines (a stuck log collector), then a call is refused at
// --max-backend-conns on one backend, which is logged at Warn on the data
// path. Calls must go on: logging never waits for stderr. Before the log
// went through cluster.LogWriter, that Warn blocked in the write holding
// the backend pool's lock, and every later call hung.
func TestProxyBlockedLogWriter(t *testing.T) {
	// Not parallel: the command sets the slog default logger.
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })

	// A backend that takes 2 streams per connection and holds every call
	// until the client cancels it.
	var holding atomic.Int64
	hln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hang := grpc.NewServer(grpc.MaxConcurrentStreams(2), grpc.UnknownServiceHandler(func(_ any, st grpc.ServerStream) error {
		holding.Add(1)
		defer holding.Add(-1)
		<-st.Context().Done()
		return st.Context().Err()
	}))
	go hang.Serve(hln)
	t.Cleanup(hang.Stop)
	ts, err := testserver.New(testserver.Config{Name: "b", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Stop)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sw := &stuckWriter{released: make(chan struct{})}
	app := startAppWriter(ctx, t, func(w io.Writer) io.Writer { sw.w = w; return sw }, []string{"proxy",
		"--listen", "127.0.0.1:0", "--backend", hln.Addr().String(), "--backend", ts.Addr(),
		"--max-backend-conns", "1", "--max-backend-pending", "-1", "--drain-timeout", "5s", "--log-format", "json"}, "listening")
	t.Cleanup(sw.unstick) // before the app's cleanup, which waits for it
	addr := app.wait(ctx, t)["listening"].Addr

	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := testgrpc.NewTestServiceClient(cc)
	// One call to each backend, so the proxy's connection to the holding
	// one knows its limit of 2 streams (with the limit unknown, calls wait
	// for the connection's SETTINGS instead of being refused).
	for range 2 {
		cctx, ccancel := context.WithTimeout(ctx, 300*time.Millisecond)
		client.EmptyCall(cctx, &testgrpc.Empty{})
		ccancel()
	}
	sw.stuck.Store(true)

	// Round robin: 4 of 8 calls go to the holding backend. Two take its
	// one connection's 2 streams; the other two are refused there (the
	// Warn) and go to b, as do the other 4.
	holdCtx, release := context.WithCancel(ctx)
	var held sync.WaitGroup
	returned := make(chan error, 8)
	for range 8 {
		held.Add(1)
		go func() {
			defer held.Done()
			_, err := client.EmptyCall(holdCtx, &testgrpc.Empty{})
			returned <- err
		}()
	}
	defer func() { release(); held.Wait() }()
	deadline := time.After(10 * time.Second)
	for i := range 6 {
		select {
		case err := <-returned:
			if err != nil {
				t.Errorf("a call that was not held failed: %v", err)
			}
		case <-deadline:
			t.Fatalf("calls hang with stderr blocked: %d held at the backend, %d of the 6 others returned", holding.Load(), i)
		}
	}
	// The two held calls may reach the backend's handler after the others
	// returned (1 run in 16 checked at once saw 0 or 1).
	for wait := time.After(10 * time.Second); holding.Load() != 2; {
		select {
		case <-wait:
			t.Fatalf("%d calls held at the backend, want 2 (its connection's streams)", holding.Load())
		case <-time.After(5 * time.Millisecond):
		}
	}

	// Further calls, on this connection and on a new one.
	for i := range 4 {
		cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := client.EmptyCall(cctx, &testgrpc.Empty{})
		ccancel()
		if err != nil {
			t.Errorf("call %d with stderr blocked: %v", i, err)
		}
	}
	cc2, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
	_, err = testgrpc.NewTestServiceClient(cc2).EmptyCall(cctx, &testgrpc.Empty{})
	ccancel()
	cc2.Close()
	if err != nil {
		t.Errorf("call on a new connection with stderr blocked: %v", err)
	}

	release()
	held.Wait()
	sw.unstick()
	if err := app.shutdown(t); err != nil {
		t.Errorf("proxy command returned %v, want nil", err)
	}
	const warn = "calls refused: every connection to the backend is full (max backend connections)"
	if _, ok := app.seen[warn]; !ok {
		t.Errorf("the refusal was not logged once stderr took lines again (want %q)", warn)
	}
	if _, ok := app.seen["drained"]; !ok {
		t.Error(`"drained" was not logged: the log was not flushed when the command returned`)
	}
}
