package cluster

import (
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
)

// resetAs is a failure the client was sent as another code, as the data
// plane reports a call it had to reset (proxy.ClientStatus).
type resetAs struct {
	error
	code codes.Code
}

func (e resetAs) ClientCode() codes.Code { return e.code }
func (e resetAs) Unwrap() error          { return e.error }

var _ proxy.ClientStatus = resetAs{}

// TestAtk6FinishedCountsClientCode: a call whose client got INTERNAL (a
// reset) while the failure was UNAVAILABLE (its backend was lost) is
// counted in streamlb_calls_finished_total under INTERNAL, the code the
// client got, while the director still learns UNAVAILABLE.
func TestAtk6FinishedCountsClientCode(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	c, err := New(Config{Targets: []string{"10.0.0.1:80"}, Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	m := c.metrics
	if err := m.UpdateState(resolver.State{Addresses: []resolver.Address{{Addr: "10.0.0.1:80"}}}); err != nil {
		t.Fatal(err)
	}
	var told error
	p := &meteredPicker{m: m, next: proxy.PickerFunc(func(context.Context, string) (string, func(error), error) {
		return "10.0.0.1:80", func(err error) { told = err }, nil
	})}
	_, done, err := p.Pick(context.Background(), "/s/M")
	if err != nil {
		t.Fatal(err)
	}
	done(resetAs{error: status.Error(codes.Unavailable, "backend lost"), code: codes.Internal})
	if got := counterValue(m.finished.WithLabelValues("10.0.0.1:80", "Internal")); got != 1 {
		t.Errorf("finished{code=Internal} = %v, want 1", got)
	}
	if got := counterValue(m.finished.WithLabelValues("10.0.0.1:80", "Unavailable")); got != 0 {
		t.Errorf("finished{code=Unavailable} = %v, want 0", got)
	}
	if status.Code(told) != codes.Unavailable {
		t.Errorf("the director was told %v, want Unavailable", told)
	}
}

func counterValue(c prometheus.Counter) float64 {
	var mt dto.Metric
	if err := c.Write(&mt); err != nil {
		return -1
	}
	return mt.GetCounter().GetValue()
}
