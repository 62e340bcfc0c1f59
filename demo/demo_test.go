package demo_test

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/streamlb/streamlb/demo"
)

// TestDemo runs the headless-service demo with a short configuration and
// checks what it is there to show: streamlb follows the records over its
// one client connection with no failed call, while the direct client stays
// on one pod.
func TestDemo(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out bytes.Buffer
	res, err := demo.Run(ctx, demo.Config{
		Steps:        []int{2, 4, 1},
		StepDuration: 1500 * time.Millisecond,
		Refresh:      200 * time.Millisecond,
		Rate:         300,
		Interval:     500 * time.Millisecond,
		Logger:       slog.New(slog.DiscardHandler),
	}, &out)
	if err != nil {
		t.Fatalf("RunDemo: %v\n%s", err, out.String())
	}
	checkSteps(t, res)
	for _, want := range []string{"=== step 2/3: 4 pods", "=== summary", demo.ViaProxy, demo.Direct, "pod-4"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	t.Logf("demo output:\n%s", out.String())
}

func TestDemoConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  demo.Config
		ok   bool
	}{
		{name: "zero", ok: true},
		{name: "no pods", cfg: demo.Config{Steps: []int{3, 0}}},
		{name: "too many pods", cfg: demo.Config{Steps: []int{51}}},
		{name: "negative rate", cfg: demo.Config{Rate: -1}},
		{name: "negative duration", cfg: demo.Config{StepDuration: -time.Second}},
		{name: "etcd", cfg: demo.Config{Registry: demo.RegistryEtcd}, ok: true},
		{name: "unknown registry", cfg: demo.Config{Registry: "consul"}},
		{name: "short lease", cfg: demo.Config{Registry: demo.RegistryEtcd, LeaseTTL: time.Second}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.cfg.Validate(); (err == nil) != tc.ok {
				t.Errorf("Validate() = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// TestDemoEtcd runs the demo with pods registering in the embedded etcd:
// streamlb follows registrations, deregistrations and a killed pod's
// lease expiry with no failed call in any step, while the direct client
// stays on one pod.
func TestDemoEtcd(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out bytes.Buffer
	res, err := demo.Run(ctx, demo.Config{
		Registry:     demo.RegistryEtcd,
		LeaseTTL:     2 * time.Second,
		Steps:        []int{2, 4, 1},
		StepDuration: 1500 * time.Millisecond,
		Rate:         300,
		Interval:     -1,
		Logger:       slog.New(slog.DiscardHandler),
	}, &out)
	if err != nil {
		t.Fatalf("Run: %v\n%s", err, out.String())
	}
	checkSteps(t, res)
	for _, want := range []string{"embedded etcd", "pod-4 killed without deregistering", "streamlb followed the registry in", "=== summary"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	t.Logf("failed calls during the changes: %v", res.ChangeErrors)
	t.Logf("demo output:\n%s", out.String())
}

// checkSteps checks what the demo is there to show, over steps of 2, 4 and
// 1 pods: no call through streamlb fails, only pods of the set get calls
// and every one a fair part (pods added by scale-out included: they
// appear within a small part of the step), while pick_first keeps the
// direct client on one pod while 4 are up.
func checkSteps(t *testing.T, res *demo.Result) {
	t.Helper()
	if len(res.Steps) != 3 {
		t.Fatalf("got %d steps, want 3", len(res.Steps))
	}
	for i, s := range res.Steps {
		if n := s.Errors[demo.ViaProxy]; n != 0 {
			t.Errorf("step %d: %d calls through streamlb failed, want none", i+1, n)
		}
		var total int64
		for _, p := range s.Pods {
			total += s.Calls[demo.ViaProxy][p]
		}
		for p, n := range s.Calls[demo.ViaProxy] {
			if !contains(s.Pods, p) {
				t.Errorf("step %d: pod %s, not in the set, got %d calls through streamlb", i+1, p, n)
			}
		}
		for _, p := range s.Pods {
			share := float64(s.Calls[demo.ViaProxy][p]) / float64(total)
			if want := 0.5 / float64(len(s.Pods)); share < want {
				t.Errorf("step %d: pod %s got %.0f%% of proxied calls, want at least %.0f%%", i+1, p, share*100, want*100)
			}
		}
	}
	used := 0
	for _, n := range res.Steps[1].Calls[demo.Direct] {
		if n > 0 {
			used++
		}
	}
	if used != 1 {
		t.Errorf("direct client used %d pods in the 4-pod step, want 1 (grpc-go pick_first without re-resolution)", used)
	}
}
