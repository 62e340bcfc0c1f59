package loadtest

import (
	"fmt"
	"time"

	"github.com/bojand/ghz/runner"
)

// Result is what one Run measured. The summary (Count, Total, RPS, Latency,
// StatusCodes) is ghz's, measured at the client; Backends, WireLatency and
// Timeline come from the connection tap, which reads the backend header of
// every call.
//
// Two clocks measure latency. The client clock (Latency) is ghz's: from the
// call starting in the caller to its result returning, so it includes the
// time a call waits inside the client for the shared connection. The wire
// clock (WireLatency, Backend.P50 and P99) runs from the request's HEADERS
// frame leaving the client to the end of the response arriving, and is the
// one per-backend figures can be measured on. Both are over the calls that
// succeeded.
type Result struct {
	Name          string
	Target        string
	Call          string
	BackendHeader string
	Connections   int
	Concurrency   int
	// Started is when the load began.
	Started time.Time
	// Request is how the calls were made.
	Request Request
	// EndReason is why the run ended: EndTotal, EndDuration or EndCancel.
	EndReason string

	// Count is the number of calls made, failed ones included.
	Count uint64
	// Total is the run's wall time, from the first call.
	Total time.Duration
	// RPS is Count / Total.
	RPS float64
	// Latency summarises the calls that succeeded, on the client clock.
	Latency Latency
	// WireLatency summarises the calls the tap saw succeed, on the wire
	// clock, the one the per-backend latencies use.
	WireLatency Latency
	// Errors is the number of calls that failed.
	Errors uint64
	// StatusCodes counts calls by gRPC status code name ("OK",
	// "Unavailable", ...).
	StatusCodes map[string]int
	// ErrorMessages counts failed calls by error message, as ghz reports
	// them.
	ErrorMessages map[string]int

	// Backends has one row per backend name seen, sorted by name, with
	// UnknownBackend last when some calls carried no name.
	Backends []Backend
	// Histogram is the latency histogram of the calls that succeeded, on
	// the client clock.
	Histogram []Bucket
	// Timeline is calls and errors per backend over time.
	Timeline Timeline

	// Notes are caveats about the numbers, for example calls the tap could
	// not follow.
	Notes []string
}

// Latency is a latency summary.
type Latency struct {
	Average, Fastest, Slowest time.Duration
	P50, P90, P99             time.Duration
}

// Backend is one backend's row in a Result.
type Backend struct {
	// Name is the value of the backend header, or UnknownBackend.
	Name string
	// Calls counts the calls attributed to the backend, failed ones
	// included; Errors those among them that failed.
	Calls, Errors int64
	// Share is Calls as a percentage (0..100) of all attributed calls,
	// UnknownBackend's included.
	Share float64
	// P50 and P99 are the latency percentiles of the backend's calls that
	// succeeded, on the wire clock: from the request's HEADERS frame
	// leaving the client to the end of the response arriving. Compare them
	// with Result.WireLatency, not Result.Latency.
	P50, P99 time.Duration
}

// Reasons a run ended (Result.EndReason).
const (
	EndTotal    = "normal"   // all Total calls made
	EndDuration = "duration" // Duration reached
	EndCancel   = "cancel"   // interrupted
)

// Request is how the calls of a run were made, for the reports.
type Request struct {
	// Data is the request message as given (JSON), cut to
	// maxRequestData bytes, or a note of the binary message's size.
	Data            string
	Metadata        map[string]string
	Proto, Protoset string // both empty: server reflection
	Total           int    // 0: Duration alone bounded the run
	Duration        time.Duration
	DurationStop    string
	RPS             int // 0: unlimited
	Timeout         time.Duration
	ConnectTimeout  time.Duration
	TLS             bool
}

// maxRequestData bounds Request.Data.
const maxRequestData = 2048

func newRequest(cfg Config) Request {
	r := Request{
		Metadata: cfg.Metadata, Proto: cfg.Proto, Protoset: cfg.Protoset,
		Total: cfg.Total, Duration: cfg.Duration, DurationStop: cfg.DurationStop,
		RPS: cfg.RPS, Timeout: cfg.Timeout, ConnectTimeout: cfg.ConnectTimeout, TLS: cfg.TLS,
	}
	switch {
	case cfg.BinaryData != nil:
		r.Data = fmt.Sprintf("(binary protobuf, %d bytes)", len(cfg.BinaryData))
	case len(cfg.Data) > maxRequestData:
		r.Data = fmt.Sprintf("%s… (%d bytes)", cfg.Data[:maxRequestData], len(cfg.Data))
	default:
		r.Data = string(cfg.Data)
	}
	return r
}

// Bucket is one bar of a latency histogram: Count calls took at least Low
// and less than High (the last bucket includes High).
type Bucket struct {
	Low, High time.Duration
	Count     int
}

// histogramBuckets is the number of buckets of Result.Histogram.
const histogramBuckets = 24

// newResult sums up a run that ended for endReason.
func newResult(cfg Config, rep *runner.Report, col *collector, endReason string) *Result {
	tal := col.finish()
	rows, tapErrs, tapErr := tal.rows, tal.tapErrs, tal.tapErr
	r := &Result{
		Name:          cfg.Name,
		Target:        cfg.Target,
		Call:          cfg.Call,
		BackendHeader: cfg.BackendHeader,
		Connections:   cfg.Connections,
		Concurrency:   cfg.Concurrency,
		Started:       col.start,
		Request:       newRequest(cfg),
		EndReason:     endReason,
		Count:         rep.Count,
		Total:         rep.Total,
		RPS:           rep.Rps,
		StatusCodes:   make(map[string]int, len(rep.StatusCodeDist)),
		Backends:      rows,
		WireLatency:   tal.wire,
		Timeline:      tal.timeline,
	}
	for code, n := range rep.StatusCodeDist {
		if code == "" {
			code = "Unknown" // an error that carried no gRPC status
		}
		r.StatusCodes[code] += n
	}
	for msg, n := range rep.ErrorDist {
		r.Errors += uint64(n)
		if r.ErrorMessages == nil {
			r.ErrorMessages = make(map[string]int)
		}
		r.ErrorMessages[msg] += n
	}
	lat := okLatencies(rep)
	r.Latency = summarize(lat)
	r.Histogram = histogram(lat, histogramBuckets)

	var attributed int64
	for _, b := range rows {
		attributed += b.Calls
	}
	if tapErrs > 0 {
		r.Notes = append(r.Notes, fmt.Sprintf("%d connection directions could not be followed (%v); their calls are missing from the backend table", tapErrs, tapErr))
	}
	if cfg.DurationStop == "ignore" && r.EndReason == EndDuration {
		r.Notes = append(r.Notes, "calls cut at the duration bound are left out of the summary but counted as failed in the backend table")
	} else if attributed != int64(r.Count) && tapErrs == 0 {
		r.Notes = append(r.Notes, fmt.Sprintf("the backend table covers %d calls, the summary %d", attributed, r.Count))
	}
	return r
}

// histogram buckets sorted latencies: n equal buckets from the fastest to the
// 99.9th percentile, plus, if slower calls remain, one last bucket up to the
// slowest, so one outlier does not squash the others into the first bar.
func histogram(sorted []time.Duration, n int) []Bucket {
	if len(sorted) == 0 {
		return nil
	}
	lo, hi := sorted[0], percentile(sorted, 99.9)
	if hi <= lo {
		return []Bucket{{Low: lo, High: sorted[len(sorted)-1], Count: len(sorted)}}
	}
	width := (hi - lo + time.Duration(n) - 1) / time.Duration(n)
	buckets := make([]Bucket, n)
	for i := range buckets {
		buckets[i].Low = lo + time.Duration(i)*width
		buckets[i].High = buckets[i].Low + width
	}
	var tail *Bucket
	for _, d := range sorted {
		i := int((d - lo) / width)
		if d <= hi || i < n {
			buckets[min(i, n-1)].Count++
			continue
		}
		if tail == nil {
			buckets = append(buckets, Bucket{Low: buckets[n-1].High})
			tail = &buckets[n]
		}
		tail.Count++
		tail.High = d
	}
	return buckets
}

// summarize returns the latency summary of sorted.
func summarize(sorted []time.Duration) Latency {
	l := Latency{
		Average: mean(sorted),
		P50:     percentile(sorted, 50),
		P90:     percentile(sorted, 90),
		P99:     percentile(sorted, 99),
	}
	if len(sorted) > 0 {
		l.Fastest, l.Slowest = sorted[0], sorted[len(sorted)-1]
	}
	return l
}

// mean returns the average of d, or 0 for none.
func mean(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	var sum time.Duration
	for _, v := range d {
		sum += v
	}
	return sum / time.Duration(len(d))
}
