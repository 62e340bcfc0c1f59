package director

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"time"

	"google.golang.org/grpc/credentials"
)

// Policy names accepted in [Config.Policy].
const (
	// RoundRobin cycles through the backends in address order, starting at
	// a random offset so a fleet of proxies does not move in lockstep. It
	// ignores [resolver.Address.Weight].
	RoundRobin = "round_robin"
	// WeightedRoundRobin cycles through the backends so that each gets a
	// share of streams proportional to its [resolver.Address.Weight],
	// interleaved rather than in bursts (like nginx's smooth weighted round
	// robin).
	WeightedRoundRobin = "weighted_round_robin"
	// Random picks a backend uniformly at random. It ignores
	// [resolver.Address.Weight].
	Random = "random"
	// LeastRequest samples [Config.ChoiceCount] distinct backends at random
	// and picks the one with the fewest streams in flight (power of d
	// choices, gRFC A48).
	LeastRequest = "least_request"
	// PeakEWMA samples [Config.ChoiceCount] distinct backends at random and
	// picks the one with the lowest latency estimate times (streams in
	// flight + 1), as Linkerd and Finagle do. See [Config.EWMADecay].
	PeakEWMA = "peak_ewma"
	// RingHash maps the value of the request header [Config.HashHeader] to
	// a backend by consistent hashing, so streams with the same key go to
	// the same backend while the set is unchanged, and a set change moves
	// few keys. See [Config.RingSize].
	RingHash = "ring_hash"
)

// Bounds for [Config.ChoiceCount]. gRFC A48 uses the same default and cap.
const (
	DefaultChoiceCount = 2
	MaxChoiceCount     = 10
)

// Defaults for the peak EWMA fields of [Config]. Decay and initial RTT are
// linkerd2-proxy's EWMA_DECAY and EWMA_DEFAULT_RTT.
const (
	DefaultEWMADecay      = 10 * time.Second
	DefaultInitialRTT     = 30 * time.Millisecond
	DefaultFailurePenalty = time.Second
)

// DefaultRingSize is the default for [Config.RingSize]: ring points per
// unit of weight.
const DefaultRingSize = 100

// MaxRingPoints caps the points of one ring; see [Config.RingSize].
const MaxRingPoints = 1 << 20

// SlowStartMinPercent is the share of its weight, in percent, that a
// backend gets at the start of its slow-start window; see
// [Config.SlowStart]. Envoy's min_weight_percent defaults to the same.
const SlowStartMinPercent = 10

// Defaults for the health-check fields of [Config].
const (
	DefaultHealthCheckTimeout = time.Second
	DefaultHealthyThreshold   = 1
	DefaultUnhealthyThreshold = 2
	// MinHealthCheckInterval is the shortest HealthCheckInterval other
	// than 0 (off).
	MinHealthCheckInterval = time.Millisecond
)

// Policies returns the policy names [New] accepts, for flag help and error
// messages. The caller owns the result.
func Policies() []string {
	return []string{RoundRobin, WeightedRoundRobin, Random, LeastRequest, PeakEWMA, RingHash}
}

// Config configures a [Director]. The zero value is valid: round robin,
// outlier ejection with Envoy's defaults, no slow start, no active health
// checks, slog.Default, math/rand/v2 and time.Now.
type Config struct {
	// Policy is one of [Policies]; "" means [RoundRobin].
	Policy string
	// ChoiceCount is how many backends [LeastRequest] and [PeakEWMA]
	// sample per pick, 2..[MaxChoiceCount]; 0 means [DefaultChoiceCount].
	// Other policies ignore it.
	ChoiceCount int
	// Logger receives state-change logs; nil means slog.Default(). The
	// director adds component=director.
	Logger *slog.Logger
	// Rand supplies randomness to policies; nil means math/rand/v2's global
	// source. Pick calls it concurrently, so it must be safe for concurrent
	// use. Tests inject a deterministic source here.
	Rand interface{ IntN(n int) int }

	// EWMADecay is the time constant with which a [PeakEWMA] latency
	// estimate falls toward lower samples, and toward zero while the
	// backend gets no samples; 0 means [DefaultEWMADecay]. A sample above
	// the estimate replaces it at once (the "peak").
	EWMADecay time.Duration
	// InitialRTT is the [PeakEWMA] latency estimate of a backend that joins
	// the set; 0 means [DefaultInitialRTT].
	InitialRTT time.Duration
	// FailurePenalty is the latency sample [PeakEWMA] records for a stream
	// that ends with an error other than Canceled, if the stream took less
	// than that; 0 means [DefaultFailurePenalty]. It keeps a backend that
	// fails fast from looking fast. A Canceled stream's duration counts
	// only if it is above the backend's estimate, as a lower bound.
	FailurePenalty time.Duration

	// HashHeader is the request header whose value [RingHash] hashes, for
	// example "x-user"; matched case-insensitively. Required for
	// [RingHash], ignored by other policies. Pick reads it from the
	// incoming gRPC metadata of its ctx (metadata.NewIncomingContext); a
	// stream without it, or with an empty value, goes to a random backend.
	// Of several values the first counts.
	HashHeader string
	// RingSize is how many points [RingHash] puts on the ring per unit of
	// a backend's weight, so a backend of weight w gets w*RingSize points;
	// 0 means [DefaultRingSize]. If the ring would have more than
	// [MaxRingPoints] points, every backend's share is scaled down (at
	// least one point each).
	RingSize int

	// SlowStart, if positive, ramps up the traffic of a backend that joins
	// a non-empty set, or becomes healthy again after failing active health
	// checks, over this long. Its share starts at [SlowStartMinPercent]
	// percent of its weight and grows linearly with time to the full
	// weight: factor = max(SlowStartMinPercent/100, elapsed/SlowStart),
	// Envoy's slow start with aggression 1. The backends of the first set,
	// or of a set that follows an empty one, start at full weight: there is
	// nothing to protect them from.
	//
	// [RoundRobin], [Random] and [WeightedRoundRobin] apply the factor to
	// the weights they pick by (1 for the first two), recomputed in
	// SlowStart/20 steps. [LeastRequest] and [PeakEWMA] skip a
	// slow-starting backend they picked with probability 1-factor (factor
	// computed at the pick) and then pick once more, taking that second
	// result whatever it is. [RingHash] ignores slow start: moving keys to
	// and fro would defeat consistent hashing.
	SlowStart time.Duration

	// EjectAfter is how many streams of a backend in a row must end with
	// codes.Unavailable for the backend to be ejected: left out of picking
	// for a while. 0 means [DefaultEjectAfter]; a negative value disables
	// ejection. A stream that ends in success or with another backend
	// status ends the run; Canceled and DeadlineExceeded neither count nor
	// end it, except a route's timeout that the backend let pass without
	// answering, which counts. See [Director.Pick].
	EjectAfter int
	// BaseEjection is how long a first ejection lasts; the n-th lasts n
	// times as long, up to MaxEjection. The count decays by one for every
	// BaseEjection the backend spends back in the set. 0 means
	// [DefaultBaseEjection].
	BaseEjection time.Duration
	// MaxEjection caps one ejection's length. 0 means [DefaultMaxEjection],
	// or BaseEjection if that is longer; otherwise it must be at least
	// BaseEjection.
	MaxEjection time.Duration
	// MaxEjectionPercent is the largest share of the set, 1..100, that may
	// be ejected at once; an ejection that would exceed it does not
	// happen. Whatever the value, the last pickable backend, and the last
	// healthy one, are never ejected. 0 means [DefaultMaxEjectionPercent].
	MaxEjectionPercent int

	// HealthCheckInterval, if positive, enables active health checks over
	// grpc.health.v1: while [Director.Run] runs, every backend is checked
	// this often. 0 disables them.
	HealthCheckInterval time.Duration
	// HealthCheckTimeout bounds one check; 0 means
	// [DefaultHealthCheckTimeout].
	HealthCheckTimeout time.Duration
	// HealthCheckService is the service name sent in the check request; ""
	// asks for the health of the server as a whole.
	HealthCheckService string
	// HealthyThreshold is how many checks in a row must pass for an
	// unhealthy backend to become healthy again; 0 means
	// [DefaultHealthyThreshold].
	HealthyThreshold int
	// UnhealthyThreshold is how many checks in a row must fail (time out,
	// or fail to connect) for a healthy backend to become unhealthy; 0
	// means [DefaultUnhealthyThreshold]. A backend that answers
	// NOT_SERVING or SERVICE_UNKNOWN is unhealthy at once, whatever the
	// threshold: it said so itself.
	UnhealthyThreshold int
	// HealthCredentials secure the health checks' connections; they should
	// match what the data plane uses to reach the backends (TLS when it
	// uses TLS). Nil means cleartext (h2c).
	HealthCredentials credentials.TransportCredentials

	// ResolveNow, if set, is called when a stream ends with
	// codes.Unavailable, so that a resolver can look the backends up again
	// early: a refused connection often means the backend has moved. It is
	// called from done, concurrently and once per such stream, so it must
	// not block and should coalesce, like resolver's ResolveNow.
	ResolveNow func()

	// Now is the clock for ejection times, slow start and peak EWMA
	// latencies; nil means time.Now. Pick and done call it concurrently, so
	// it must be safe for concurrent use. Tests inject a fake clock here.
	// Health-check intervals use real time.
	Now func() time.Time
}

// settings is a validated Config with defaults applied.
type settings struct {
	policy     string
	choices    int
	rand       randSource
	now        func() time.Time
	logger     *slog.Logger
	decay      time.Duration
	initialRTT time.Duration
	penalty    time.Duration
	hashHeader string // lower case
	ringSize   int
	slowStart  time.Duration
	outlier    outlierConfig
	health     healthConfig
	resolveNow func()
}

// validate checks cfg and applies defaults.
func validate(cfg Config) (settings, error) {
	s := settings{
		policy:     cfg.Policy,
		choices:    cfg.ChoiceCount,
		rand:       cfg.Rand,
		now:        cfg.Now,
		logger:     cfg.Logger,
		decay:      cfg.EWMADecay,
		initialRTT: cfg.InitialRTT,
		penalty:    cfg.FailurePenalty,
		hashHeader: strings.ToLower(cfg.HashHeader),
		ringSize:   cfg.RingSize,
		slowStart:  cfg.SlowStart,
		resolveNow: cfg.ResolveNow,
	}
	if s.policy == "" {
		s.policy = RoundRobin
	}
	switch s.policy {
	case RoundRobin, WeightedRoundRobin, Random, LeastRequest, PeakEWMA, RingHash:
	default:
		return s, fmt.Errorf("director: unknown policy %q (valid: %s)", cfg.Policy, strings.Join(Policies(), ", "))
	}
	if s.choices == 0 {
		s.choices = DefaultChoiceCount
	}
	if (s.policy == LeastRequest || s.policy == PeakEWMA) && (s.choices < 2 || s.choices > MaxChoiceCount) {
		return s, fmt.Errorf("director: %s choice count %d out of range 2..%d", s.policy, cfg.ChoiceCount, MaxChoiceCount)
	}
	if s.policy == RingHash && s.hashHeader == "" {
		return s, fmt.Errorf("director: %s needs a hash header", RingHash)
	}
	if s.ringSize < 0 || s.ringSize > MaxRingPoints {
		return s, fmt.Errorf("director: ring size %d out of range 0..%d", cfg.RingSize, MaxRingPoints)
	}
	if s.ringSize == 0 {
		s.ringSize = DefaultRingSize
	}
	for _, d := range []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"EWMA decay", &s.decay, DefaultEWMADecay},
		{"initial RTT", &s.initialRTT, DefaultInitialRTT},
		{"failure penalty", &s.penalty, DefaultFailurePenalty},
		{"slow start", &s.slowStart, 0},
	} {
		if *d.v < 0 {
			return s, fmt.Errorf("director: %s %v is negative", d.name, *d.v)
		}
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	var err error
	if s.outlier, err = newOutlierConfig(cfg); err != nil {
		return s, err
	}
	if s.health, err = newHealthConfig(cfg); err != nil {
		return s, err
	}
	if s.rand == nil {
		s.rand = globalRand{}
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.logger == nil {
		s.logger = slog.Default()
	}
	return s, nil
}

// randSource is the randomness policies use; see [Config.Rand].
type randSource = interface{ IntN(n int) int }

// globalRand adapts math/rand/v2's goroutine-safe global source.
type globalRand struct{}

func (globalRand) IntN(n int) int { return rand.IntN(n) }
