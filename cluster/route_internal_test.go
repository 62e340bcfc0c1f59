package cluster

import (
	"testing"
	"time"
)

func TestTokenBucket(t *testing.T) {
	t.Parallel()
	now := time.Unix(1000, 0)
	b := newTokenBucket(10, 5, func() time.Time { return now })
	take := func() int {
		n := 0
		for b.allow() {
			n++
		}
		return n
	}
	for _, tc := range []struct {
		name    string
		advance time.Duration
		want    int
	}{
		{name: "starts full", want: 5},
		{name: "empty", want: 0},
		{name: "refills at rate", advance: 300 * time.Millisecond, want: 3},
		{name: "caps at burst", advance: time.Hour, want: 5},
		{name: "fractions accumulate", advance: 50 * time.Millisecond, want: 0},
		{name: "to a whole token", advance: 50 * time.Millisecond, want: 1},
		{name: "clock going back adds nothing", advance: -time.Second, want: 0},
	} {
		now = now.Add(tc.advance)
		if got := take(); got != tc.want {
			t.Errorf("%s: admitted %d, want %d", tc.name, got, tc.want)
		}
	}
}
