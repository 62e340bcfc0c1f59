package resolver

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// fakeUpdater records what a Resolver pushes and signals each call on
// updated. updateErr, if set, is returned from UpdateState.
type fakeUpdater struct {
	updateErr error
	updated   chan State // capacity large enough for the test; never blocks

	mu     sync.Mutex // guards the fields below
	states []State
	errs   []error
}

func newFakeUpdater() *fakeUpdater {
	return &fakeUpdater{updated: make(chan State, 16)}
}

func (f *fakeUpdater) UpdateState(s State) error {
	f.mu.Lock()
	f.states = append(f.states, s)
	f.mu.Unlock()
	f.updated <- s
	return f.updateErr
}

func (f *fakeUpdater) ReportError(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.errs = append(f.errs, err)
}

func (f *fakeUpdater) snapshot() ([]State, []error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]State(nil), f.states...), append([]error(nil), f.errs...)
}

func TestNewStatic(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		targets []string
		want    State
		wantErr []string // substrings that must all appear
	}{
		{
			name:    "sorted with weights",
			targets: []string{"10.0.0.2:80", "[::1]:80;weight=5", "b.example:443", "10.0.0.1:80;weight=2"},
			want: State{Addresses: []Address{
				{Addr: "10.0.0.1:80", Weight: 2},
				{Addr: "10.0.0.2:80"},
				{Addr: "[::1]:80", Weight: 5},
				{Addr: "b.example:443"},
			}},
		},
		{name: "single", targets: []string{"localhost:1"}, want: State{Addresses: []Address{{Addr: "localhost:1"}}}},
		{name: "no targets", targets: nil, wantErr: []string{"resolver: no targets given"}},
		{name: "bad target", targets: []string{"10.0.0.1:80", "10.0.0.2"}, wantErr: []string{`resolver: target "10.0.0.2": missing port`}},
		{
			name:    "duplicate",
			targets: []string{"10.0.0.1:80", "10.0.0.1:80;weight=3"},
			wantErr: []string{`resolver: duplicate target "10.0.0.1:80;weight=3" (already given as "10.0.0.1:80")`},
		},
		{
			name:    "duplicate spelled differently",
			targets: []string{"[::1]:80", "[0:0::1]:080", "Host:1", "host:1"},
			wantErr: []string{`duplicate target "[0:0::1]:080"`, `duplicate target "host:1"`},
		},
		{name: "dns", targets: []string{"dns:///b:80"}, wantErr: []string{"use New for dns:// targets"}},
		{name: "srv", targets: []string{"dns+srv:///_grpc._tcp.b"}, wantErr: []string{"use New for dns+srv:// targets"}},
		{
			name:    "all errors reported",
			targets: []string{"a", "b:0", "c:1", "c:1"},
			wantErr: []string{`"a": missing port`, `"b:0": invalid port`, `duplicate target "c:1"`},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s, err := NewStatic(tc.targets)
			if len(tc.wantErr) > 0 {
				if err == nil {
					t.Fatalf("NewStatic(%q) succeeded, want error", tc.targets)
				}
				for _, want := range tc.wantErr {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("NewStatic(%q) error = %q, want it to contain %q", tc.targets, err, want)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("NewStatic(%q) error = %v", tc.targets, err)
			}
			if diff := cmp.Diff(tc.want, s.State()); diff != "" {
				t.Errorf("State() mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestNewStaticDoesNotRetainTargets(t *testing.T) {
	t.Parallel()
	targets := []string{"a:1", "b:1"}
	s, err := NewStatic(targets)
	if err != nil {
		t.Fatal(err)
	}
	targets[0] = "z:1"
	st := s.State()
	st.Addresses[1].Addr = "mutated:1" // the caller owns State's slice
	want := State{Addresses: []Address{{Addr: "a:1"}, {Addr: "b:1"}}}
	if diff := cmp.Diff(want, s.State()); diff != "" {
		t.Errorf("State() after caller mutations (-want +got):\n%s", diff)
	}
}

func TestStaticRun(t *testing.T) {
	t.Parallel()
	s, err := NewStatic([]string{"b:2", "a:1;weight=4"})
	if err != nil {
		t.Fatal(err)
	}
	u := newFakeUpdater()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, u) }()

	want := State{Addresses: []Address{{Addr: "a:1", Weight: 4}, {Addr: "b:2"}}}
	select {
	case got := <-u.updated:
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("pushed state mismatch (-want +got):\n%s", diff)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for UpdateState")
	}

	// Run must keep blocking until ctx is cancelled.
	select {
	case err := <-done:
		t.Fatalf("Run returned %v before ctx was cancelled", err)
	default:
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run() = %v after cancel, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel")
	}

	states, errs := u.snapshot()
	if len(states) != 1 {
		t.Errorf("UpdateState called %d times, want 1", len(states))
	}
	if len(errs) != 0 {
		t.Errorf("ReportError called with %v, want no calls", errs)
	}
}

func TestStaticRunCancelledContext(t *testing.T) {
	t.Parallel()
	s, err := NewStatic([]string{"a:1"})
	if err != nil {
		t.Fatal(err)
	}
	u := newFakeUpdater()
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := s.Run(ctx, u); err != nil {
		t.Errorf("Run(cancelled ctx) = %v, want nil", err)
	}
	if states, _ := u.snapshot(); len(states) != 1 {
		t.Errorf("UpdateState called %d times, want exactly 1", len(states))
	}
}

func TestStaticRunRejected(t *testing.T) {
	t.Parallel()
	s, err := NewStatic([]string{"a:1"})
	if err != nil {
		t.Fatal(err)
	}
	errBad := errors.New("bad state")
	u := newFakeUpdater()
	u.updateErr = errBad
	// Run must return without waiting for ctx, so use one that never ends.
	err = s.Run(context.Background(), u)
	if !errors.Is(err, errBad) {
		t.Fatalf("Run() = %v, want an error wrapping %v", err, errBad)
	}
	if !strings.HasPrefix(err.Error(), "resolver: ") {
		t.Errorf("Run() error %q lacks the package prefix", err)
	}
}
