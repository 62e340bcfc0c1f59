package cluster_test

import (
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// serveLive serves a testserver named name on a countingListener, whose
// open connections the reload tests watch.
func serveLive(t *testing.T, name string) (*testserver.Server, *countingListener) {
	t.Helper()
	ts, err := testserver.New(testserver.Config{Name: name, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	return ts, serveBackend(t, ts)
}

// longCall is a streaming call in flight: it answers pings until release
// is closed, then half-closes and expects the backend's OK.
type longCall struct {
	backend string     // the backend that answered, from its header
	ready   chan error // the first ping's outcome
	done    chan error // the call's outcome
}

// startLongCall opens a FullDuplexCall with the metadata md (pairs) and
// pings over it every 20ms until release is closed.
func startLongCall(ctx context.Context, client testgrpc.TestServiceClient, release <-chan struct{}, md ...string) *longCall {
	lc := &longCall{ready: make(chan error, 1), done: make(chan error, 1)}
	if len(md) > 0 {
		ctx = metadata.AppendToOutgoingContext(ctx, md...)
	}
	go func() {
		lc.done <- lc.run(ctx, client, release)
	}()
	return lc
}

func (lc *longCall) run(ctx context.Context, client testgrpc.TestServiceClient, release <-chan struct{}) (err error) {
	first := true
	defer func() {
		if first {
			lc.ready <- err
		}
	}()
	stream, err := client.FullDuplexCall(ctx)
	if err != nil {
		return err
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if err := stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}}); err != nil {
			_, err = stream.Recv() // the status, not the io.EOF of Send
			return err
		}
		if _, err := stream.Recv(); err != nil {
			return err
		}
		if first {
			hdr, err := stream.Header()
			if err != nil {
				return err
			}
			lc.backend = testserver.BackendFromHeader(hdr)
			first = false
			lc.ready <- nil
		}
		select {
		case <-release:
			if err := stream.CloseSend(); err != nil {
				return err
			}
			if _, err := stream.Recv(); err != io.EOF {
				return fmt.Errorf("after CloseSend: %v, want io.EOF", err)
			}
			return nil
		case <-tick.C:
		}
	}
}

// TestReloadKeepsLongCalls runs long streaming calls on two clusters
// across a reload that changes the retry policy every cluster inherits
// (proxy.retry_on: cluster a gets a new Upstream, and new connections)
// and removes cluster b. The calls outlive drain_timeout (1s) and all
// end OK: a reload is no reason to cut them. Afterwards the replaced and
// the removed clusters' old backend connections are closed, and only the
// new one of a is left.
func TestReloadKeepsLongCalls(t *testing.T) {
	_, lnA := serveLive(t, "a")
	_, lnB := serveLive(t, "b")
	dir := t.TempDir()
	const drain = time.Second
	both := fmt.Sprintf(`
drain_timeout: %v
clusters:
  - {name: a, targets: [%s]}
  - {name: b, targets: [%s]}
routes:
  - {match: {headers: [{name: x-route, exact: b}]}, cluster: b}
  - {cluster: a}
`, drain, lnA.Addr(), lnB.Addr())
	r := runFile(t, writeConfig(t, dir, both), false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)

	release := make(chan struct{})
	var calls []*longCall
	for range 3 {
		calls = append(calls, startLongCall(ctx, client, release))
		calls = append(calls, startLongCall(ctx, client, release, "x-route", "b"))
	}
	for i, lc := range calls {
		if err := <-lc.ready; err != nil {
			t.Fatalf("long call %d did not start: %v", i, err)
		}
	}
	if a, b := lnA.open.Load(), lnB.open.Load(); a != 1 || b != 1 {
		t.Fatalf("backend connections before the reload: a %d, b %d; want 1 each", a, b)
	}

	writeConfig(t, dir, fmt.Sprintf(`
drain_timeout: %v
proxy: {retry_on: [grpc.testing.TestService/EmptyCall]}
clusters:
  - {name: a, targets: [%s]}
routes:
  - {cluster: a}
`, drain, lnA.Addr()))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	// A new call dials with the new retry policy.
	if got, err := backendOf(ctx, client); err != nil || got != "a" {
		t.Fatalf("call after the reload: backend %q, %v; want a, nil", got, err)
	}
	if a := lnA.open.Load(); a != 2 {
		t.Errorf("a's backend connections after the reload: %d, want 2 (the old one carries the calls in flight)", a)
	}

	// Outlive the drain timeout by half of it: this is what the calls
	// must survive, so the test waits for it rather than for an event.
	outlive := time.NewTimer(drain + drain/2)
	select {
	case <-outlive.C:
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	for i, lc := range calls {
		select {
		case err := <-lc.done:
			t.Fatalf("long call %d (cluster %s) ended before its end: %v", i, lc.backend, err)
		default:
		}
	}
	close(release)
	for i, lc := range calls {
		if err := <-lc.done; err != nil {
			t.Errorf("long call %d (cluster %s) across the reload: %v, want OK", i, lc.backend, err)
		}
	}
	testkit.WaitFor(ctx, t, "the old connections to close after their last call", func() bool {
		return lnA.open.Load() == 1 && lnB.open.Load() == 0
	})
	// The new connection of a still serves.
	if _, err := backendOf(ctx, client); err != nil {
		t.Fatal(err)
	}
	if a := lnA.open.Load(); a != 1 {
		t.Errorf("a's backend connections at the end: %d, want 1", a)
	}
}

// retryConf is a file of one cluster, a, for the reload tests that
// change its retry policy: the drain timeout, the retry_on list and the
// targets go in.
const retryConf = `
drain_timeout: %v
proxy: {retry_on: %s}
clusters:
  - {name: a, targets: [%s], ejection: {after: -1}}
routes:
  - {cluster: a}
`

// TestReloadBoundsBackendThatLeft: a reload that changes a cluster's
// retry policy and removes one of its targets. The call in flight on the
// backend that stays runs to its end on the old connection; the one on
// the backend that left the set is cut once drain_timeout passed, with a
// status that says so, and that backend's connection closes.
func TestReloadBoundsBackendThatLeft(t *testing.T) {
	_, ln1 := serveLive(t, "one")
	_, ln2 := serveLive(t, "two")
	dir := t.TempDir()
	const drain = 500 * time.Millisecond
	r := runFile(t, writeConfig(t, dir, fmt.Sprintf(retryConf, drain, "[]", ln1.Addr().String()+", "+ln2.Addr().String())), false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)

	release := make(chan struct{})
	byBackend := map[string][]*longCall{}
	for range 4 { // round robin: two on each
		lc := startLongCall(ctx, client, release)
		if err := <-lc.ready; err != nil {
			t.Fatal(err)
		}
		byBackend[lc.backend] = append(byBackend[lc.backend], lc)
	}
	if len(byBackend["one"]) == 0 || len(byBackend["two"]) == 0 {
		t.Fatalf("long calls by backend: %v, want some on each", byBackend)
	}

	writeConfig(t, dir, fmt.Sprintf(retryConf, drain, "[grpc.testing.TestService/EmptyCall]", ln1.Addr()))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	start := time.Now()
	for _, lc := range byBackend["two"] {
		err := <-lc.done
		st := status.Convert(err)
		if st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "left the set") ||
			!strings.Contains(st.Message(), "drain timeout "+drain.String()) {
			t.Errorf("call on the backend that left: %v; want UNAVAILABLE saying it left the set and naming the drain timeout", err)
		}
	}
	if d := time.Since(start); d < drain/2 {
		t.Errorf("the calls on the backend that left were cut %v after the reload, before the drain timeout (%v)", d, drain)
	}
	testkit.WaitFor(ctx, t, "the connection to the backend that left to close", func() bool { return ln2.open.Load() == 0 })
	close(release)
	for _, lc := range byBackend["one"] {
		if err := <-lc.done; err != nil {
			t.Errorf("call on the backend that stayed: %v, want OK", err)
		}
	}
	testkit.WaitFor(ctx, t, "the old connection to the backend that stayed to close", func() bool { return ln1.open.Load() == 0 })
}

// TestReloadBoundsBackendThatLeftLater: calls on the connection of a
// cluster that two reloads replaced are still bounded when their backend
// leaves the set at the second: only the last replaced generation was
// followed, and such calls ran to their end (attack round 5).
func TestReloadBoundsBackendThatLeftLater(t *testing.T) {
	_, ln1 := serveLive(t, "one")
	_, ln2 := serveLive(t, "two")
	dir := t.TempDir()
	const drain = 500 * time.Millisecond
	r := runFile(t, writeConfig(t, dir, fmt.Sprintf(retryConf, drain, "[]", ln1.Addr())), false)
	client := dial(t, r.addr)
	ctx := testkit.Context(t, 30*time.Second)
	release := make(chan struct{})
	defer close(release)
	var calls []*longCall
	for range 2 {
		lc := startLongCall(ctx, client, release)
		if err := <-lc.ready; err != nil {
			t.Fatal(err)
		}
		calls = append(calls, lc)
	}
	// First reload: a new retry policy, the same backend. The calls go on.
	writeConfig(t, dir, fmt.Sprintf(retryConf, drain, "[grpc.testing.TestService/EmptyCall]", ln1.Addr()))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	// Second: another policy, and the backend replaced.
	writeConfig(t, dir, fmt.Sprintf(retryConf, drain, "[grpc.testing.TestService/UnaryCall]", ln2.Addr()))
	if err := r.srv.Reload(ctx); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	for _, lc := range calls {
		err := <-lc.done
		if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "left the set") {
			t.Errorf("call on the backend that left two reloads later: %v; want UNAVAILABLE saying it left the set", err)
		}
	}
	testkit.WaitFor(ctx, t, "the connection to the backend that left to close", func() bool { return ln1.open.Load() == 0 })
}
