package cluster

import (
	"context"
	"fmt"
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
	got := gathered(t, reg)
	if v := got["streamlb_calls_finished_total,backend=10.0.0.1:80,code=Internal"]; v != 1 {
		t.Errorf("finished{code=Internal} = %v, want 1", v)
	}
	if v := got["streamlb_calls_finished_total,backend=10.0.0.1:80,code=Unavailable"]; v != 0 {
		t.Errorf("finished{code=Unavailable} = %v, want 0", v)
	}
	if status.Code(told) != codes.Unavailable {
		t.Errorf("the director was told %v, want Unavailable", told)
	}
}

// gathered is reg's samples by name and labels but the cluster's
// ("name,label=value,..."): a counter's or gauge's value, a histogram's
// count (its sum and buckets under name_sum and name_bucket,le=...).
func gathered(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range fams {
		for _, mt := range f.GetMetric() {
			labels := ""
			for _, l := range mt.GetLabel() {
				if l.GetName() != "cluster" {
					labels += "," + l.GetName() + "=" + l.GetValue()
				}
			}
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				got[f.GetName()+labels] = mt.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				got[f.GetName()+labels] = mt.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				h := mt.GetHistogram()
				got[f.GetName()+labels] = float64(h.GetSampleCount())
				got[f.GetName()+"_sum"+labels] = h.GetSampleSum()
				for _, b := range h.GetBucket() {
					got[fmt.Sprintf("%s_bucket%s,le=%g", f.GetName(), labels, b.GetUpperBound())] = float64(b.GetCumulativeCount())
				}
			}
		}
	}
	return got
}
