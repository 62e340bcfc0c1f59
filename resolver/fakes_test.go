package resolver

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// testTimeout bounds every wait of a test.
const testTimeout = 30 * time.Second

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// fakeAnswer is one answer of a fakeLookuper.
type fakeAnswer struct {
	ips []string    // lookupHost: IP literals
	srv []srvRecord // lookupSRV
	ttl time.Duration
	err error
}

// fakeLookuper is a table-backed lookuper: call i gets answers[i], and the
// last answer repeats. Each call is announced on calls, with the host asked.
type fakeLookuper struct {
	t     *testing.T
	calls chan string // buffered; never blocks in practice

	mu      sync.Mutex // guards the fields below
	answers []fakeAnswer
	n       int
}

func newFakeLookuper(t *testing.T, answers ...fakeAnswer) *fakeLookuper {
	return &fakeLookuper{t: t, calls: make(chan string, 1000), answers: answers}
}

// set replaces the answers still to come with answers.
func (f *fakeLookuper) set(answers ...fakeAnswer) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.answers = append(f.answers[:min(f.n, len(f.answers))], answers...)
}

func (f *fakeLookuper) next(host string) fakeAnswer {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.answers) == 0 {
		f.t.Errorf("unexpected lookup of %q", host)
		return fakeAnswer{err: errors.New("no answer")}
	}
	a := f.answers[min(f.n, len(f.answers)-1)]
	f.n++
	f.calls <- host
	return a
}

func (f *fakeLookuper) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.n
}

func (f *fakeLookuper) lookupHost(_ context.Context, host string) ([]netip.Addr, time.Duration, error) {
	a := f.next(host)
	if a.err != nil {
		return nil, 0, a.err
	}
	var ips []netip.Addr
	for _, s := range a.ips {
		ips = append(ips, netip.MustParseAddr(s))
	}
	return ips, a.ttl, nil
}

func (f *fakeLookuper) lookupSRV(_ context.Context, name string) ([]srvRecord, time.Duration, error) {
	a := f.next(name)
	if a.err != nil {
		return nil, 0, a.err
	}
	return slices.Clone(a.srv), a.ttl, nil
}

// fakeTimer is one After call of a fakeClock.
type fakeTimer struct {
	d time.Duration
	c chan time.Time
}

// fakeClock is a manual clock. After calls are announced on timers and fire
// only when the test fires them.
type fakeClock struct {
	timers chan fakeTimer // buffered; never blocks in practice

	mu  sync.Mutex // guards now
	now time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{timers: make(chan fakeTimer, 1000), now: time.Unix(1_000_000, 0)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	tm := fakeTimer{d: d, c: make(chan time.Time, 1)}
	c.timers <- tm
	return tm.c
}

// fire advances the clock by the timer's duration and fires it.
func (c *fakeClock) fire(tm fakeTimer) {
	c.advance(tm.d)
	tm.c <- c.Now()
}

// fixedRand returns the same value from every Float64 call.
type fixedRand float64

func (r fixedRand) Float64() float64 { return float64(r) }

// recUpdater records what a Resolver pushes and never blocks. notify gets
// a token (capacity 1) after every call, so tests can wait for changes.
type recUpdater struct {
	updateErr func(State) error // optional

	notify chan struct{}

	mu     sync.Mutex // guards the fields below
	states []State
	errs   []error
}

func newRecUpdater() *recUpdater { return &recUpdater{notify: make(chan struct{}, 1)} }

func (u *recUpdater) UpdateState(s State) error {
	var err error
	if u.updateErr != nil {
		err = u.updateErr(s)
	}
	u.mu.Lock()
	if err == nil {
		u.states = append(u.states, s)
	}
	u.mu.Unlock()
	u.signal()
	return err
}

func (u *recUpdater) ReportError(err error) {
	u.mu.Lock()
	u.errs = append(u.errs, err)
	u.mu.Unlock()
	u.signal()
}

func (u *recUpdater) signal() {
	select {
	case u.notify <- struct{}{}:
	default:
	}
}

func (u *recUpdater) snapshot() ([]State, []error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.states), slices.Clone(u.errs)
}

// last returns the last accepted set's addresses as strings, and whether
// any set was accepted.
func (u *recUpdater) last() ([]string, bool) {
	states, _ := u.snapshot()
	if len(states) == 0 {
		return nil, false
	}
	return addrStrings(states[len(states)-1].Addresses), true
}

// waitFor waits until cond holds, re-checking after every call to u, or
// fails the test when ctx is done.
func (u *recUpdater) waitFor(ctx context.Context, t *testing.T, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			states, errs := u.snapshot()
			t.Fatalf("timed out waiting for %s; states = %v, errs = %v", what, states, errs)
		case <-u.notify:
		}
	}
}

// waitSet waits until the last accepted set is want.
func (u *recUpdater) waitSet(ctx context.Context, t *testing.T, want ...string) {
	t.Helper()
	u.waitFor(ctx, t, "set "+strings.Join(want, ","), func() bool {
		got, ok := u.last()
		return ok && slices.Equal(got, want)
	})
}

func addrStrings(as []Address) []string {
	out := []string{}
	for _, a := range as {
		out = append(out, addressString(a))
	}
	return out
}

// syncBuffer is a bytes.Buffer safe for a slog handler writing while the
// test reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// logCapture returns a logger writing text records at Debug and above to
// the returned buffer.
func logCapture() (*slog.Logger, *syncBuffer) {
	b := &syncBuffer{}
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug})), b
}

// runResolver runs r.Run(ctx, u) on a goroutine until cleanup, which
// cancels it and checks that Run returned nil.
func runResolver(t *testing.T, r Resolver, u Updater) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx, u) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run() = %v after cancel, want nil", err)
			}
		case <-time.After(testTimeout):
			t.Errorf("Run did not return after cancel")
		}
	})
}

func mustTarget(t *testing.T, s string) Target {
	t.Helper()
	tg, err := ParseTarget(s)
	if err != nil {
		t.Fatal(err)
	}
	return tg
}
