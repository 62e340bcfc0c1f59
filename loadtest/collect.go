package loadtest

import (
	"math"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// UnknownBackend is the backend name under which a Result counts calls whose
// response carried no backend header, such as calls the proxy itself failed
// or calls cut before any response.
const UnknownBackend = "(unknown)"

// collector gathers the calls the taps of one Run observe. It is safe for
// concurrent use. Lock order: tapConn.mu before collector.mu.
type collector struct {
	path string           // :path of the method under test, "/pkg.Service/Method"
	hdr  string           // lower-case backend header name
	now  func() time.Time // clock for call latencies and timestamps
	// start is the time the load began; set once by Run before the first
	// call can be recorded, read-only afterwards.
	start time.Time

	done   atomic.Int64 // calls recorded, for progress
	failed atomic.Int64 // calls recorded as failed, for progress

	mu       sync.Mutex // guards the fields below
	conns    []*tapConn
	backends map[string]*backendTally
	tapErr   error // first error of a frameReader
	tapErrs  int   // directions that stopped being followed
}

// backendTally is what the taps saw of one backend.
type backendTally struct {
	calls, errors int64
	recs          []callRec // every call, in the order recorded
}

// callRec is one call as the tap saw it.
type callRec struct {
	end time.Duration // when it ended, from collector.start
	lat time.Duration // wire latency
	ok  bool
}

func newCollector(path, header string, now func() time.Time) *collector {
	return &collector{path: path, hdr: header, now: now, backends: make(map[string]*backendTally)}
}

// tap wraps conn so its frames are followed. The caller hands conn over.
func (c *collector) tap(conn net.Conn) net.Conn {
	tc := &tapConn{Conn: conn, col: c, streams: make(map[uint32]*tapStream)}
	tc.out = newFrameReader(true, c.hdr, tapOut{tc})
	tc.in = newFrameReader(false, c.hdr, tapIn{tc})
	c.mu.Lock()
	c.conns = append(c.conns, tc)
	c.mu.Unlock()
	return tc
}

// record counts one call that ended at end after lat on the wire.
func (c *collector) record(backend string, ok bool, end time.Time, lat time.Duration) {
	if backend == "" {
		backend = UnknownBackend
	}
	rec := callRec{end: end.Sub(c.start), lat: lat, ok: ok}
	c.done.Add(1)
	if !ok {
		c.failed.Add(1)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.backends[backend]
	if t == nil {
		t = &backendTally{}
		c.backends[backend] = t
	}
	t.calls++
	if !ok {
		t.errors++
	}
	t.recs = append(t.recs, rec)
}

func (c *collector) tapFailed(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.tapErrs++
	if c.tapErr == nil {
		c.tapErr = err
	}
}

// tally is what finish hands to newResult.
type tally struct {
	rows     []Backend
	wire     Latency // over all calls the taps saw succeed
	timeline Timeline
	tapErrs  int
	tapErr   error
}

// finish seals every tapped connection, so calls still open count as failed
// and nothing is recorded any more, and sums up what was recorded: the
// per-backend rows sorted by name, UnknownBackend last, with shares of all
// recorded calls, the wire latencies and the timeline.
func (c *collector) finish() tally {
	c.mu.Lock()
	conns := slices.Clone(c.conns)
	c.mu.Unlock()
	for _, tc := range conns {
		tc.seal()
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	var total int64
	var all []time.Duration
	for _, t := range c.backends {
		total += t.calls
	}
	var out tally
	for name, t := range c.backends {
		lat := okWire(t.recs)
		all = append(all, lat...)
		b := Backend{
			Name:   name,
			Calls:  t.calls,
			Errors: t.errors,
			P50:    percentile(lat, 50),
			P99:    percentile(lat, 99),
		}
		if total > 0 {
			b.Share = 100 * float64(t.calls) / float64(total)
		}
		out.rows = append(out.rows, b)
	}
	sortBackends(out.rows)
	slices.Sort(all)
	out.wire = summarize(all)
	out.timeline = c.timelineLocked(out.rows)
	out.tapErrs, out.tapErr = c.tapErrs, c.tapErr
	return out
}

// okWire returns the sorted wire latencies of the calls in recs that
// succeeded.
func okWire(recs []callRec) []time.Duration {
	lat := make([]time.Duration, 0, len(recs))
	for _, r := range recs {
		if r.ok {
			lat = append(lat, r.lat)
		}
	}
	slices.Sort(lat)
	return lat
}

// sortBackends orders rows by name, with UnknownBackend last.
func sortBackends(rows []Backend) {
	slices.SortFunc(rows, func(a, b Backend) int {
		switch {
		case a.Name == b.Name:
			return 0
		case a.Name == UnknownBackend:
			return 1
		case b.Name == UnknownBackend:
			return -1
		case a.Name < b.Name:
			return -1
		default:
			return 1
		}
	})
}

// percentile returns the p-th percentile of sorted by the nearest-rank
// method, as ghz computes its latency distribution, or 0 for no values.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}
