package proxy

import (
	"net"
	"testing"
	"time"
)

// deadlineConn records the write deadlines set on it.
type deadlineConn struct {
	net.Conn
	set []time.Time
}

func (c *deadlineConn) SetWriteDeadline(d time.Time) error {
	c.set = append(c.set, d)
	return nil
}

// TestArmWriteKeepsRecentDeadline: armWrite moves the write deadline only
// when the one set is older than a sixteenth of the write timeout (a
// runtime timer update per write saved, issue 12), and every write still
// gets at least fifteen sixteenths of the timeout from its start.
func TestArmWriteKeepsRecentDeadline(t *testing.T) {
	const wt = 800 * time.Millisecond
	c := &deadlineConn{}
	tr := &transport{nc: c, writeTimeout: wt}
	start := time.Now()
	for range 100 {
		tr.armWrite()
	}
	if took := time.Since(start); took >= wt/16 {
		t.Skipf("100 arms took %v, longer than a sixteenth of the timeout: cannot tell", took)
	}
	if len(c.set) != 1 {
		t.Fatalf("%d deadlines set for 100 writes within %v, want 1", len(c.set), wt/16)
	}
	for i := range 5 {
		time.Sleep(wt / 32)
		before := time.Now()
		tr.armWrite()
		d := c.set[len(c.set)-1]
		if left := d.Sub(before); left < wt*15/16 {
			t.Fatalf("write %d: deadline %v after it began, want at least %v", i, left, wt*15/16)
		}
	}
	if len(c.set) < 2 {
		t.Fatalf("the deadline was never moved over %v of writes", 5*wt/32)
	}
	tr.writeTimeout = -1
	n := len(c.set)
	tr.armWrite()
	if len(c.set) != n {
		t.Fatal("a deadline was set with no write timeout")
	}
}
