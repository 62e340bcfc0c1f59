//go:build linux

package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
)

// Attack round 3 on the admin listener (--admin-listen): a client of the
// admin port must not be able to take the process's file descriptors or
// memory, nor hold a connection for ever, since the data plane shares
// them.

// startAdminProxy starts a proxy process with an admin listener in front
// of one backend and returns it with its gRPC and admin addresses.
func startAdminProxy(ctx context.Context, t *testing.T) (p *proc, grpcAddr, adminAddr string) {
	t.Helper()
	ts := startBackend(t)
	p = startProc(t, "proxy", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--backend", ts.Addr(), "--log-format", "json")
	admin, _ := p.waitLog(ctx, t, 0, "admin listening")
	rec, _ := p.waitLog(ctx, t, 0, "listening")
	return p, rec.Addr, admin.Addr
}

// procStatus returns field (VmRSS, ...) of /proc/PID/status in KiB.
func procStatus(t *testing.T, pid int, field string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			n, err := strconv.Atoi(strings.Fields(v)[0])
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

func openFDs(pid int) int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents)
}

// emptyCall makes one call through the proxy on a new client connection.
func emptyCall(ctx context.Context, t *testing.T, addr string) error {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	_, err = testgrpc.NewTestServiceClient(cc).EmptyCall(cctx, &testgrpc.Empty{})
	return err
}

// healthz asks GET /healthz on a new connection and returns the status
// line, or the error.
func healthz(addr string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := fmt.Fprint(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		return "", err
	}
	return bufio.NewReader(c).ReadString('\n')
}

// holdConns opens n connections to addr, par at a time, runs send on each
// one it could open, and returns them; they are closed when t ends.
func holdConns(t *testing.T, addr string, n, par int, send func(net.Conn)) []net.Conn {
	var mu sync.Mutex
	var held []net.Conn
	var wg sync.WaitGroup
	sem := make(chan struct{}, par)
	for range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := net.DialTimeout("tcp", addr, 2*time.Second)
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
			send(c)
		}()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	return held
}

// TestAttackR3AdminConnsKeepDataPlane: admin connections that asked for
// /healthz once and then stay open (keep-alive: two minutes each, renewed
// by one request) used to be unlimited, so one client of the admin port
// could take every file descriptor of the process: the data plane's
// accept failed with EMFILE ("accept failing; backing off") and gRPC
// clients got no connection. Here the proxy runs with RLIMIT_NOFILE 256
// (the default limits are larger; the attack is the same with as many
// connections) and 300 idle admin connections are opened. The data plane
// must still serve a call from a new client, and a new /healthz probe must
// still be answered (an orchestrator's liveness probe).
func TestAttackR3AdminConnsKeepDataPlane(t *testing.T) {
	ctx := testkit.Context(t, 60*time.Second)
	p, grpcAddr, adminAddr := startAdminProxy(ctx, t)
	pid := p.cmd.Process.Pid
	const limit = 256
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: limit, Max: limit}, nil); err != nil {
		t.Skipf("prlimit: %v", err)
	}
	if err := emptyCall(ctx, t, grpcAddr); err != nil {
		t.Fatalf("before the attack: %v", err)
	}

	held := holdConns(t, adminAddr, 300, 32, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(2 * time.Second))
		fmt.Fprint(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
		bufio.NewReader(c).ReadString('\n')
	})
	fds := openFDs(pid)
	t.Logf("%d admin connections opened; the proxy holds %d file descriptors (limit %d)", len(held), fds, limit)

	if err := emptyCall(ctx, t, grpcAddr); err != nil {
		t.Errorf("a gRPC call while an admin client holds idle connections: %v, want OK (the proxy holds %d of %d fds)", err, fds, limit)
	}
	if line, err := healthz(adminAddr); err != nil || !strings.Contains(line, " 200 ") {
		t.Errorf("a new /healthz probe while an admin client holds idle connections: %q, %v; want 200", line, err)
	}
}

// TestAttackR3AdminHugeHeaders: the admin listener took request headers
// up to net/http's default MaxHeaderBytes, 1 MiB, for up to its
// ReadHeaderTimeout (5 s) per connection, with no bound on connections:
// 1,000 connections each sending 1 MiB of headers it never ended took the
// proxy to 1.4 GB of RSS, and gRPC calls through it failed meanwhile.
// Here 100 such connections must not grow the proxy's RSS by more than
// 32 MiB, and one of 64 KiB is answered 431 at once (nginx takes 32 KiB of
// headers at most by default, Envoy's admin 60 KiB, HAProxy 16 KiB).
func TestAttackR3AdminHugeHeaders(t *testing.T) {
	ctx := testkit.Context(t, 60*time.Second)
	p, grpcAddr, adminAddr := startAdminProxy(ctx, t)
	pid := p.cmd.Process.Pid

	t.Run("431", func(t *testing.T) {
		c, err := net.Dial("tcp", adminAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		fmt.Fprint(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n")
		line := "X-A: " + strings.Repeat("a", 1000) + "\r\n"
		for range 64 {
			if _, err := c.Write([]byte(line)); err != nil {
				break // answered and closed
			}
		}
		got, err := bufio.NewReader(c).ReadString('\n')
		if !strings.Contains(got, " 431 ") {
			t.Errorf("64 KiB of request headers: %q, %v; want 431 Request Header Fields Too Large", got, err)
		}
	})

	t.Run("rss", func(t *testing.T) {
		if err := emptyCall(ctx, t, grpcAddr); err != nil {
			t.Fatal(err)
		}
		before := procStatus(t, pid, "VmRSS")
		const size = 1 << 20
		line := []byte("X-A: " + strings.Repeat("a", 8000) + "\r\n")
		held := holdConns(t, adminAddr, 100, 16, func(c net.Conn) {
			c.SetWriteDeadline(time.Now().Add(3 * time.Second))
			fmt.Fprint(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n")
			for sent := 0; sent < size-len(line); sent += len(line) {
				if _, err := c.Write(line); err != nil {
					return // refused or answered
				}
			}
		})
		time.Sleep(300 * time.Millisecond)
		after := procStatus(t, pid, "VmRSS")
		t.Logf("RSS %d KiB before, %d KiB with %d connections of 1 MiB unfinished headers", before, after, len(held))
		if grew := after - before; grew > 32<<10 {
			t.Errorf("the proxy's RSS grew by %d KiB, want at most 32 MiB", grew)
		}
	})
}

// TestAttackR3AdminUnfinishedBody: a request with a body that never
// arrives (Content-Length: 100000, 10 bytes sent) held its admin
// connection for ever: no endpoint reads a body, but net/http reads what
// is left of it before answering (up to 256 KiB), with no read deadline
// once the headers are in (ReadHeaderTimeout only bounds those; the
// connection is not idle, so IdleTimeout does not apply). Such
// connections, unlimited in number, never time out. The connection must
// be answered or closed within a few seconds.
func TestAttackR3AdminUnfinishedBody(t *testing.T) {
	ctx := testkit.Context(t, 60*time.Second)
	_, _, adminAddr := startAdminProxy(ctx, t)
	for _, method := range []string{"GET", "POST"} {
		t.Run(method, func(t *testing.T) {
			t.Parallel()
			c, err := net.Dial("tcp", adminAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			start := time.Now()
			c.SetDeadline(start.Add(10 * time.Second))
			fmt.Fprintf(c, "%s /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789", method)
			var buf [512]byte
			for {
				if _, err := c.Read(buf[:]); err != nil {
					if ne, ok := err.(net.Error); ok && ne.Timeout() {
						t.Fatalf("%s with an unfinished body: the connection was still open after %v, want it answered and closed", method, time.Since(start).Round(time.Millisecond))
					}
					t.Logf("closed after %v", time.Since(start).Round(time.Millisecond))
					return
				}
			}
		})
	}
}
