package director

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Compile-time check of the proxy's optional RetryPicker seam, by shape.
var _ interface {
	PickExcluding(ctx context.Context, fullMethod string, tried []string) (addr string, done func(error), err error)
} = (*Director)(nil)

func TestPickExcluding(t *testing.T) {
	t.Parallel()
	all := []string{"10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"}
	for _, policy := range Policies() {
		for _, tc := range []struct {
			name  string
			tried []string
			want  []string // acceptable picks
		}{
			{name: "one tried", tried: all[:1], want: all[1:]},
			{name: "two tried", tried: []string{all[2], all[0]}, want: all[1:2]},
			{name: "all tried", tried: all, want: all},
		} {
			t.Run(policy+"/"+tc.name, func(t *testing.T) {
				t.Parallel()
				cfg := Config{Policy: policy, Logger: discardLogger(), Rand: fakeRand(func(int) int { return 0 })}
				if policy == RingHash {
					cfg.HashHeader = "x-key"
				}
				d, err := New(cfg)
				if err != nil {
					t.Fatal(err)
				}
				mustUpdate(t, d, state(all...))
				ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("x-key", "k"))
				for range 20 {
					addr, done, err := d.PickExcluding(ctx, "/s/m", tc.tried)
					if err != nil {
						t.Fatal(err)
					}
					done(nil)
					if !slices.Contains(tc.want, addr) {
						t.Fatalf("PickExcluding(tried=%v) = %s, want one of %v", tc.tried, addr, tc.want)
					}
				}
				for _, b := range d.Backends() {
					if b.InFlight != 0 {
						t.Errorf("%s: in flight %d after every done, want 0", b.Addr, b.InFlight)
					}
				}
			})
		}
	}
}

func TestPickExcludingNoBackend(t *testing.T) {
	t.Parallel()
	d := newTestDirector(t)
	if _, done, err := d.PickExcluding(context.Background(), "/s/m", []string{"a:1"}); err != ErrNoBackend || done != nil {
		t.Errorf("empty set: got done %v err %v, want nil and ErrNoBackend", done != nil, err)
	}
}

// drainingErr is the shape of the proxy's Draining errors.
type drainingErr struct{ error }

func (drainingErr) Draining() bool { return true }

// unansweredErr is the shape of the proxy's Unanswered errors.
type unansweredErr struct{ error }

func (unansweredErr) Unanswered() bool { return true }

func TestClassify(t *testing.T) {
	t.Parallel()
	unavailable := status.Error(codes.Unavailable, "refused")
	for _, tc := range []struct {
		name string
		err  error
		want outcome
	}{
		{name: "ok", err: nil, want: outcomeReachable},
		{name: "unavailable", err: unavailable, want: outcomeUnreachable},
		{name: "application error", err: status.Error(codes.NotFound, "x"), want: outcomeReachable},
		{name: "cancelled", err: status.Error(codes.Canceled, "x"), want: outcomeNeutral},
		{name: "context deadline", err: context.DeadlineExceeded, want: outcomeNeutral},
		{name: "draining backend", err: drainingErr{unavailable}, want: outcomeNeutral},
		{name: "draining, wrapped", err: fmt.Errorf("attempt: %w", drainingErr{unavailable}), want: outcomeNeutral},
		{name: "deadline", err: status.Error(codes.DeadlineExceeded, "x"), want: outcomeNeutral},
		{name: "route timeout unanswered", err: unansweredErr{status.Error(codes.DeadlineExceeded, "route timeout")}, want: outcomeUnreachable},
		{name: "unanswered, wrapped", err: fmt.Errorf("attempt: %w", unansweredErr{status.Error(codes.DeadlineExceeded, "route timeout")}), want: outcomeUnreachable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := classify(tc.err); got != tc.want {
				t.Errorf("classify(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}
