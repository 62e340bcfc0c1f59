package testkit

import (
	"net"
	"testing"
	"time"
)

func TestDeadAddrRefuses(t *testing.T) {
	addr := DeadAddr(t)
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err == nil {
		c.Close()
		t.Fatalf("dial %s succeeded, want refused", addr)
	}
}

func TestWaitFor(t *testing.T) {
	ctx := Context(t, 5*time.Second)
	n := 0
	WaitFor(ctx, t, "three polls", func() bool { n++; return n == 3 })
	if n != 3 {
		t.Errorf("cond called %d times, want 3", n)
	}
	if ctx.Err() != nil {
		t.Errorf("Context ended early: %v", ctx.Err())
	}
}
