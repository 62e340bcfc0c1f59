package resolver

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// scriptedResolver is a child Resolver driven by the test: each function
// sent on calls is run with Run's Updater.
type scriptedResolver struct {
	calls chan func(Updater)
	err   error // returned by Run once calls is closed
}

func newScripted() *scriptedResolver { return &scriptedResolver{calls: make(chan func(Updater))} }

func (s *scriptedResolver) Run(ctx context.Context, u Updater) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case f, ok := <-s.calls:
			if !ok {
				return s.err
			}
			f(u)
		}
	}
}

// push makes the child push addrs ("host:port" or "host:port;weight=N").
func (s *scriptedResolver) ResolveNow() {}

func (s *scriptedResolver) push(t *testing.T, addrs ...string) {
	t.Helper()
	var st State
	for _, a := range addrs {
		tg := mustTarget(t, a)
		st.Addresses = append(st.Addresses, Address{Addr: tg.Addr(), Weight: tg.Weight})
	}
	sortAddresses(st.Addresses)
	s.do(func(u Updater) { u.UpdateState(st) })
}

func (s *scriptedResolver) fail(err error) {
	s.do(func(u Updater) { u.ReportError(err) })
}

// do runs f in Run and returns once f has returned, so calls made through
// different children reach the Group in the order the test made them.
func (s *scriptedResolver) do(f func(Updater)) {
	done := make(chan struct{})
	s.calls <- func(u Updater) {
		defer close(done)
		f(u)
	}
	<-done
}

func TestGroupMerge(t *testing.T) {
	t.Parallel()
	a, b, c := newScripted(), newScripted(), newScripted()
	g := &Group{
		children: []child{{name: "a", r: a}, {name: "b", r: b}, {name: "c", r: c}},
		logger:   slog.New(slog.DiscardHandler),
	}
	u := newRecUpdater()
	runResolver(t, g, u)
	ctx := testContext(t)
	errBoom := errors.New("boom")

	// Nothing is pushed until every child has reported once.
	a.push(t, "10.0.0.1:80;weight=5", "10.0.0.2:80")
	b.push(t, "10.0.0.2:80;weight=9", "10.0.0.3:80")
	if states, _ := u.snapshot(); len(states) != 0 {
		t.Fatalf("pushed %v before every child reported", states)
	}
	c.fail(errBoom) // an error counts as a report
	// The first child that has an address gives its weight.
	u.waitSet(ctx, t, "10.0.0.1:80;weight=5", "10.0.0.2:80", "10.0.0.3:80")
	if _, errs := u.snapshot(); len(errs) != 1 || !errors.Is(errs[0], errBoom) {
		t.Errorf("ReportError calls = %v, want [%v]", errs, errBoom)
	}

	c.push(t, "10.0.0.4:80")
	u.waitSet(ctx, t, "10.0.0.1:80;weight=5", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80")

	// A child's error keeps its set in the union.
	b.fail(errBoom)
	u.waitFor(ctx, t, "the second error", func() bool { _, errs := u.snapshot(); return len(errs) == 2 })

	// A change that leaves the union as it is pushes nothing.
	a.push(t, "10.0.0.1:80;weight=5", "10.0.0.2:80", "10.0.0.3:80")
	b.push(t, "10.0.0.4:80")
	c.push(t, "10.0.0.4:80", "10.0.0.1:80")
	c.push(t, "10.0.0.5:80") // forces a visible change after the ones above
	u.waitSet(ctx, t, "10.0.0.1:80;weight=5", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80", "10.0.0.5:80")
	states, _ := u.snapshot()
	if len(states) != 3 {
		t.Errorf("%d pushes, want 3: %v", len(states), states)
	}

	// Emptied children empty the union.
	a.push(t)
	b.push(t)
	c.push(t)
	u.waitSet(ctx, t)
}

func TestGroupChildStops(t *testing.T) {
	t.Parallel()
	a, b := newScripted(), newScripted()
	b.err = errors.New("gave up")
	g := &Group{children: []child{{name: "a", r: a}, {name: "b", r: b}}, logger: slog.New(slog.DiscardHandler)}
	u := newRecUpdater()
	runResolver(t, g, u)
	ctx := testContext(t)
	a.push(t, "10.0.0.1:80")
	b.push(t, "10.0.0.2:80")
	u.waitSet(ctx, t, "10.0.0.1:80", "10.0.0.2:80")
	close(b.calls)
	u.waitFor(ctx, t, "b's error", func() bool {
		_, errs := u.snapshot()
		return len(errs) == 1 && strings.Contains(errs[0].Error(), "resolver: b stopped: gave up")
	})
	a.push(t, "10.0.0.3:80")
	u.waitSet(ctx, t, "10.0.0.2:80", "10.0.0.3:80")
}

func TestGroupRejectedUnion(t *testing.T) {
	t.Parallel()
	a := newScripted()
	g := &Group{children: []child{{name: "a", r: a}}, logger: slog.New(slog.DiscardHandler)}
	u := newRecUpdater()
	u.updateErr = func(s State) error {
		if len(s.Addresses) == 0 {
			return errors.New("empty")
		}
		return nil
	}
	runResolver(t, g, u)
	ctx := testContext(t)
	a.push(t, "10.0.0.1:80")
	u.waitSet(ctx, t, "10.0.0.1:80")
	a.push(t) // rejected
	a.push(t, "10.0.0.1:80")
	a.push(t, "10.0.0.2:80")
	u.waitSet(ctx, t, "10.0.0.2:80")
	// The rejected empty set left the accepted one in place, so offering
	// 10.0.0.1 again was not needed.
	if states, _ := u.snapshot(); len(states) != 2 {
		t.Errorf("accepted %d sets, want 2: %v", len(states), states)
	}
}

func TestNew(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		targets  []string
		opts     DNSOptions
		children []string
		wantErr  []string
	}{
		{name: "static only", targets: []string{"10.0.0.2:80", "10.0.0.1:80"}, children: []string{"static"}},
		{
			name:     "mixed",
			targets:  []string{"dns:///a.svc:80", "10.0.0.1:80", "dns+srv://127.0.0.1:53/_grpc._tcp.b.svc", "DNS:///C.svc:80"},
			children: []string{"static", "dns:///a.svc:80", "dns+srv://127.0.0.1:53/_grpc._tcp.b.svc", "dns:///c.svc:80"},
		},
		{name: "no targets", wantErr: []string{"resolver: no targets given"}},
		{
			name:    "all problems",
			targets: []string{"dns:///a:80", "DNS:///A:80", "x", "10.0.0.1:80", "10.0.0.1:080"},
			opts:    DNSOptions{Jitter: 2},
			wantErr: []string{
				`duplicate target "DNS:///A:80" (already given as "dns:///a:80")`,
				`target "x": missing port`,
				`duplicate target "10.0.0.1:080"`,
				"Jitter 2 not below 1",
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r, err := New(tc.targets, tc.opts)
			if len(tc.wantErr) > 0 {
				if err == nil {
					t.Fatal("New succeeded, want an error")
				}
				for _, want := range tc.wantErr {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("New error = %q, want it to contain %q", err, want)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			g := r.(*Group)
			var names []string
			for _, c := range g.children {
				names = append(names, c.name)
				if _, isDNS := c.r.(*DNS); isDNS == (c.name == "static") {
					t.Errorf("child %s: resolver %T", c.name, c.r)
				}
			}
			if diff := cmp.Diff(tc.children, names); diff != "" {
				t.Errorf("children mismatch (-want +got):\n%s", diff)
			}
			g.ResolveNow() // never blocks, Run or not
		})
	}
}

func TestGroupStaticOnlyRun(t *testing.T) {
	t.Parallel()
	r, err := New([]string{"10.0.0.2:80", "10.0.0.1:80;weight=3"}, DNSOptions{})
	if err != nil {
		t.Fatal(err)
	}
	u := newRecUpdater()
	runResolver(t, r, u)
	u.waitSet(testContext(t), t, "10.0.0.1:80;weight=3", "10.0.0.2:80")
}

func TestUnionAddresses(t *testing.T) {
	t.Parallel()
	got := unionAddresses([][]Address{
		{{Addr: "b:1", Weight: 2}, {Addr: "c:1"}},
		nil,
		{{Addr: "a:1"}, {Addr: "b:1", Weight: 7}},
	})
	want := []Address{{Addr: "a:1"}, {Addr: "b:1", Weight: 2}, {Addr: "c:1"}}
	if !slices.Equal(got, want) {
		t.Errorf("unionAddresses = %v, want %v", got, want)
	}
}
