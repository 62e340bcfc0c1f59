//go:build unix

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/testserver"
)

// proc is the test binary running `streamlb args...` as a process of its
// own (see runMainEnv), its JSON log lines read from stderr.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when the process exited and its log was read
	err  error         // Wait's, once done is closed

	mu   sync.Mutex
	logs []logRecord
	more chan struct{} // closed and replaced when a line arrives
}

func startProc(t *testing.T, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), runMainEnv+"=1")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{}), more: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			var rec logRecord
			if json.Unmarshal(sc.Bytes(), &rec) != nil {
				rec.Msg = sc.Text()
			}
			p.mu.Lock()
			p.logs = append(p.logs, rec)
			close(p.more)
			p.more = make(chan struct{})
			p.mu.Unlock()
		}
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.done
	})
	return p
}

// waitLog returns the first record with message msg at index from or
// later, and its index, failing t if the process exits or ctx ends first.
func (p *proc) waitLog(ctx context.Context, t *testing.T, from int, msg string) (logRecord, int) {
	t.Helper()
	for {
		p.mu.Lock()
		for i := from; i < len(p.logs); i++ {
			if rec := p.logs[i]; rec.Msg == msg {
				p.mu.Unlock()
				return rec, i
			}
		}
		from = max(from, len(p.logs))
		more := p.more
		p.mu.Unlock()
		select {
		case <-more:
		case <-p.done:
			t.Fatalf("the proxy exited (%v) before it logged %q", p.err, msg)
		case <-ctx.Done():
			t.Fatalf("the proxy never logged %q", msg)
		}
	}
}

// TestProxySighup: SIGHUP to a proxy started with flags, no --config,
// while a call is in flight (logrotate's postrotate for --access-log).
// The proxy keeps serving, the call in flight ends OK, and after the
// access log file was renamed away, new lines go to a new file at its
// path. Without an access log file, it logs that there was nothing to
// reload. Before, SIGHUP was handled only with --config and killed the
// process.
func TestProxySighup(t *testing.T) {
	ts := startBackend(t)
	ctx := testkit.Context(t, 60*time.Second)

	call := func(t *testing.T, addr string, md ...string) error {
		t.Helper()
		cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		_, err = testgrpc.NewTestServiceClient(cc).EmptyCall(metadata.AppendToOutgoingContext(ctx, md...), &testgrpc.Empty{})
		return err
	}
	// lines waits until path holds n lines, and returns them.
	lines := func(t *testing.T, path string, n int) []string {
		t.Helper()
		var got []string
		testkit.WaitFor(ctx, t, "access log lines in "+path, func() bool {
			b, _ := os.ReadFile(path)
			got = strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
			return len(b) > 0 && len(got) >= n
		})
		return got
	}
	stop := func(t *testing.T, p *proc) { t.Helper(); stopProc(ctx, t, p) }

	t.Run("access log", func(t *testing.T) {
		dir := t.TempDir()
		path := filepath.Join(dir, "access.log")
		p := startProc(t, "proxy", "--listen", "127.0.0.1:0", "--backend", ts.Addr(), "--access-log", path,
			"--log-format", "json", "--release-startup-pages=false")
		rec, at := p.waitLog(ctx, t, 0, "listening")
		if err := call(t, rec.Addr); err != nil {
			t.Fatal(err)
		}
		lines(t, path, 1)
		if err := os.Rename(path, path+".1"); err != nil {
			t.Fatal(err)
		}
		// A call in flight across the signal, 1s long.
		inFlight := make(chan error, 1)
		go func() { inFlight <- call(t, rec.Addr, testserver.MetadataDelay, "1s") }()
		p.cmd.Process.Signal(syscall.SIGHUP)
		p.waitLog(ctx, t, at, "access log reopened")
		if err := <-inFlight; err != nil {
			t.Errorf("call in flight across SIGHUP: %v", err)
		}
		if err := call(t, rec.Addr); err != nil {
			t.Errorf("call after SIGHUP: %v", err)
		}
		if got := lines(t, path, 2); len(got) != 2 || !strings.Contains(got[0], `"msg":"call"`) {
			t.Errorf("new access log file: %q, want the 2 calls since SIGHUP", got)
		}
		if got := lines(t, path+".1", 1); len(got) != 1 {
			t.Errorf("rotated access log file: %q, want the 1 call before SIGHUP", got)
		}
		stop(t, p)
	})

	t.Run("access log beside --config", func(t *testing.T) {
		// The access log is the process's, as the log flags: it goes
		// beside --config, and SIGHUP then reopens it and reloads the
		// file. It was refused there, which left no way to an access log
		// for a proxy configured by file.
		dir := t.TempDir()
		path := filepath.Join(dir, "access.log")
		conf := filepath.Join(dir, "streamlb.yaml")
		text := fmt.Sprintf("listen: 127.0.0.1:0\nclusters:\n  - {name: a, targets: [%s]}\nroutes:\n  - {cluster: a}\n", ts.Addr())
		if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		p := startProc(t, "proxy", "--config", conf, "--access-log", path, "--log-format", "json", "--release-startup-pages=false")
		rec, at := p.waitLog(ctx, t, 0, "listening")
		if err := call(t, rec.Addr); err != nil {
			t.Fatal(err)
		}
		if got := lines(t, path, 1); !strings.Contains(got[0], `"cluster":"a"`) {
			t.Errorf("access log line %q does not name the file's cluster", got[0])
		}
		if err := os.Rename(path, path+".1"); err != nil {
			t.Fatal(err)
		}
		p.cmd.Process.Signal(syscall.SIGHUP)
		p.waitLog(ctx, t, at, "access log reopened")
		p.waitLog(ctx, t, at, "configuration reloaded")
		if err := call(t, rec.Addr); err != nil {
			t.Errorf("call after SIGHUP: %v", err)
		}
		if got := lines(t, path, 1); len(got) != 1 {
			t.Errorf("new access log file: %q, want the call since SIGHUP", got)
		}
		stop(t, p)
	})

	t.Run("nothing to reload", func(t *testing.T) {
		p := startProc(t, "proxy", "--listen", "127.0.0.1:0", "--backend", ts.Addr(),
			"--log-format", "json", "--release-startup-pages=false")
		rec, at := p.waitLog(ctx, t, 0, "listening")
		p.cmd.Process.Signal(syscall.SIGHUP)
		p.waitLog(ctx, t, at, "nothing to reload: no configuration file and no access log file")
		if err := call(t, rec.Addr); err != nil {
			t.Errorf("call after SIGHUP: %v", err)
		}
		stop(t, p)
	})
}

// TestProxySighupDuringLastFlush: a SIGHUP that comes while the proxy,
// drained, waits for a stderr nobody reads to take its last lines (up to
// 2 s) does not kill it: it still exits 0. signal.Stop ran before that
// flush, and the SIGHUP's default action ended the process (attack round
// 5).
func TestProxySighupDuringLastFlush(t *testing.T) {
	ts := startBackend(t)
	addr := testkit.FreeAddr(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := exec.Command(os.Args[0], "proxy", "--listen", addr, "--backend", ts.Addr(), "--log-level", "debug", "--drain-timeout", "200ms")
	cmd.Env = append(os.Environ(), runMainEnv+"=1")
	cmd.Stderr = w // never read until the end: the pipe fills
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	t.Cleanup(func() { cmd.Process.Kill() })
	ctx := testkit.Context(t, 30*time.Second)
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := testgrpc.NewTestServiceClient(cc)
	// A debug line per call: more than a pipe holds.
	testkit.WaitFor(ctx, t, "the proxy to serve", func() bool {
		_, err := client.EmptyCall(ctx, &testgrpc.Empty{})
		return err == nil
	})
	for range 2000 {
		if _, err := client.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
	cmd.Process.Signal(syscall.SIGTERM)
	time.Sleep(700 * time.Millisecond) // drained (200 ms), flushing (up to 2 s)
	cmd.Process.Signal(syscall.SIGHUP)
	err = cmd.Wait()
	if err != nil {
		t.Errorf("the proxy exited with %v, want 0", err)
	}
}

// stopProc sends SIGTERM to p and checks that it exits 0.
func stopProc(ctx context.Context, t *testing.T, p *proc) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-ctx.Done():
		t.Fatal("the proxy did not exit on SIGTERM")
	}
	if p.err != nil {
		t.Errorf("the proxy exited with %v after SIGTERM, want 0", p.err)
	}
}
