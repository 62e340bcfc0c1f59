package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"

	// go.yaml.in/yaml/v3 (the maintained yaml.v3) rather than
	// sigs.k8s.io/yaml: the latter converts YAML to JSON first and so loses
	// line numbers, and an operator fixing a file wants the line.
	"go.yaml.in/yaml/v3"

	"github.com/streamlb/streamlb/director"
	"github.com/streamlb/streamlb/internal/fileread"
	"github.com/streamlb/streamlb/proxy"
	"github.com/streamlb/streamlb/resolver"
)

// File is a parsed and checked configuration file: listeners, the global
// proxy settings, named clusters and the routes that send calls to them.
// Get one with [LoadFile] or [ParseFile]; it is immutable afterwards.
// Clusters and routes can be reloaded while the proxy runs; everything
// else takes effect at the next start.
type File struct {
	// Path is the file it was read from ("" for ParseFile with no name).
	Path string
	raw  []byte // the contents parsed

	Listen       string        `yaml:"listen"`
	AdminListen  string        `yaml:"admin_listen"`
	Engine       string        `yaml:"engine"`
	DrainTimeout time.Duration `yaml:"drain_timeout"`
	// Metrics turns Prometheus metrics on; absent means on.
	Metrics    *bool          `yaml:"metrics"`
	TLS        *fileTLS       `yaml:"tls"`
	BackendTLS *fileBackendTL `yaml:"backend_tls"`
	Proxy      fileProxy      `yaml:"proxy"`
	Clusters   []fileCluster  `yaml:"clusters"`
	Routes     []fileRoute    `yaml:"routes"`
}

type fileTLS struct {
	Cert     string `yaml:"cert"`
	Key      string `yaml:"key"`
	ClientCA string `yaml:"client_ca"`
}

type fileBackendTL struct {
	CA         string `yaml:"ca"`
	ServerName string `yaml:"server_name"`
	Cert       string `yaml:"cert"`
	Key        string `yaml:"key"`
}

// fileProxy holds the data plane's global limits; zero means the proxy
// package's default, as with the flags.
type fileProxy struct {
	ConnectTimeout            time.Duration `yaml:"connect_timeout"`
	HandshakeTimeout          time.Duration `yaml:"handshake_timeout"`
	MaxConcurrentStreams      uint32        `yaml:"max_concurrent_streams"`
	MaxConnections            int           `yaml:"max_connections"`
	IdleTimeout               time.Duration `yaml:"idle_timeout"`
	RequestIdleTimeout        time.Duration `yaml:"request_idle_timeout"`
	WriteTimeout              time.Duration `yaml:"write_timeout"`
	MaxStreams                int64         `yaml:"max_streams"`
	MaxStreamsPerBackend      int64         `yaml:"max_streams_per_backend"`
	MaxBackendConns           int           `yaml:"max_backend_conns"`
	MaxBackendPending         int           `yaml:"max_backend_pending"`
	BackendPendingTimeout     time.Duration `yaml:"backend_pending_timeout"`
	BackendIdleTimeout        time.Duration `yaml:"backend_idle_timeout"`
	BackendKeepaliveTime      time.Duration `yaml:"backend_keepalive_time"`
	BackendKeepaliveTimeout   time.Duration `yaml:"backend_keepalive_timeout"`
	MaxHeaderListSize         uint32        `yaml:"max_header_list_size"`
	MaxResponseHeaderListSize uint32        `yaml:"max_response_header_list_size"`
	MaxConnBuffer             int64         `yaml:"max_conn_buffer"`
	BackendStreamWindow       int32         `yaml:"backend_stream_window"`
	BackendStreamWindowMax    int32         `yaml:"backend_stream_window_max"`
	RetryBuffer               int           `yaml:"retry_buffer"`
	ResponseHoldback          int           `yaml:"response_holdback"`
	MaxMessageSize            int           `yaml:"max_message_size"`
	// LoopHeader is the forwarding-loop guard (--loop-header); absent
	// means on.
	LoopHeader *bool `yaml:"loop_header"`
	// The retry policy of the clusters without their own (see fileRetry).
	RetryOn          []string `yaml:"retry_on"`
	MaxRetries       *int     `yaml:"max_retries"`        // see retriesOf
	RetryBudget      *int     `yaml:"retry_budget"`       // see budgetOf
	RetryBudgetRatio *float64 `yaml:"retry_budget_ratio"` // see ratioOf
}

// fileRetry is a cluster's own retry policy. A field left out takes the
// value under proxy (retry_on, max_retries, retry_budget,
// retry_budget_ratio); retry_on: [] turns retries of UNAVAILABLE off for
// the cluster.
type fileRetry struct {
	RetryOn     *[]string `yaml:"retry_on"`
	MaxRetries  *int      `yaml:"max_retries"`  // see retriesOf
	Budget      *int      `yaml:"budget"`       // see budgetOf
	BudgetRatio *float64  `yaml:"budget_ratio"` // see ratioOf
}

// fileCluster is one cluster's settings. Two clusters with equal
// fileCluster values are the same cluster: a reload keeps it running.
type fileCluster struct {
	Name          string        `yaml:"name"`
	Targets       []string      `yaml:"targets"`
	DNSRefresh    time.Duration `yaml:"dns_refresh"`
	DNSRespectTTL bool          `yaml:"dns_respect_ttl"`
	Etcd          *fileRegistry `yaml:"etcd"`
	ZooKeeper     *fileRegistry `yaml:"zookeeper"`
	Policy        string        `yaml:"policy"`
	ChoiceCount   int           `yaml:"choice_count"`
	HashHeader    string        `yaml:"hash_header"`
	RingSize      int           `yaml:"ring_size"`
	SlowStart     time.Duration `yaml:"slow_start"`
	HealthCheck   struct {
		Interval           time.Duration `yaml:"interval"`
		Timeout            time.Duration `yaml:"timeout"`
		Service            string        `yaml:"service"`
		HealthyThreshold   int           `yaml:"healthy_threshold"`
		UnhealthyThreshold int           `yaml:"unhealthy_threshold"`
	} `yaml:"health_check"`
	Ejection struct {
		After      int           `yaml:"after"`
		Base       time.Duration `yaml:"base"`
		Max        time.Duration `yaml:"max"`
		MaxPercent int           `yaml:"max_percent"`
	} `yaml:"ejection"`
	// BackendTLS, if set, replaces the file's backend_tls for this
	// cluster; Retry, if set, its retry policy (see fileRetry).
	BackendTLS *fileBackendTL `yaml:"backend_tls"`
	Retry      *fileRetry     `yaml:"retry"`
}

// fileRegistry is how a cluster reaches the registry of its etcd:// or
// zk:// targets: TLS files and a user. The password is never in the file:
// password_env names the environment variable that holds it, read at each
// load.
type fileRegistry struct {
	CA          string `yaml:"ca"`
	Cert        string `yaml:"cert"`
	Key         string `yaml:"key"`
	Username    string `yaml:"username"`
	PasswordEnv string `yaml:"password_env"`
}

// check validates r's pairs; what the resolver checks (files) it leaves.
func (r *fileRegistry) check() (field, msg string) {
	switch {
	case r == nil:
		return "", ""
	case (r.Cert == "") != (r.Key == ""):
		return "", "cert and key go together"
	case r.Username != "" && r.PasswordEnv == "":
		return "password_env", "required with username: the environment variable that holds the password"
	case r.Username == "" && r.PasswordEnv != "":
		return "username", "required with password_env"
	case r.PasswordEnv != "" && os.Getenv(r.PasswordEnv) == "":
		return "password_env", fmt.Sprintf("environment variable %s is not set", r.PasswordEnv)
	}
	return "", ""
}

type fileRoute struct {
	Name  string `yaml:"name"`
	Match struct {
		Service      string        `yaml:"service"`
		MethodPrefix string        `yaml:"method_prefix"`
		Headers      []headerMatch `yaml:"headers"`
	} `yaml:"match"`
	// Cluster names the one cluster the route's calls go to; Clusters,
	// instead, several, each call going to one of them at random in
	// proportion to their weights (Envoy's weighted_clusters).
	Cluster  string            `yaml:"cluster"`
	Clusters []weightedCluster `yaml:"clusters"`
	// Timeout bounds each call on the route, with the client's own
	// deadline if that is earlier (Envoy's route timeout); 0: none.
	Timeout   time.Duration `yaml:"timeout"`
	RateLimit *struct {
		Rate  float64 `yaml:"rate"`
		Burst int     `yaml:"burst"`
	} `yaml:"rate_limit"`
}

// weightedCluster is one of a route's weighted clusters. Weight is
// required, so that a weight left out is an error rather than a cluster
// silently taking no calls.
type weightedCluster struct {
	Name   string       `yaml:"name"`
	Weight *routeWeight `yaml:"weight"`
}

// routeWeight is a weighted cluster's weight: a YAML integer only, where
// yaml.v3 would truncate a float into an int (0.5 to 0: a cluster
// silently given no calls).
type routeWeight int

func (w *routeWeight) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" {
		// A TypeError, which the decoder collects with its own: the
		// message gains the field's path (cleanYAMLError).
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: cannot unmarshal %s `%s` as a weight (a whole number)", n.Line, n.ShortTag(), n.Value)}}
	}
	var v int
	if err := n.Decode(&v); err != nil {
		return err
	}
	*w = routeWeight(v)
	return nil
}

// maxTotalWeight bounds the sum of a route's weights, as Envoy bounds
// its total_weight to a uint32: the draw is an int, also on 32-bit
// platforms.
const maxTotalWeight = math.MaxInt32

// headerMatch matches one request header: its first value equals Exact,
// starts with Prefix, or (Present) the header is there at all. Exactly
// one of the three is set.
type headerMatch struct {
	Name    string  `yaml:"name"`
	Exact   *string `yaml:"exact"`
	Prefix  *string `yaml:"prefix"`
	Present bool    `yaml:"present"`
}

// LoadFile reads and checks the configuration file at path. It reads the
// TLS files it names, the listener's and the backends' (an error names
// the setting and its line), but opens no connection and starts nothing.
func LoadFile(path string) (*File, error) {
	data, err := fileread.Regular(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	f, err := loadData(path, data)
	if err != nil {
		return nil, err
	}
	// Not in loadData, which a reload calls too: a reload keeps the
	// listener's TLS as it runs (tls needs a restart), its files reloaded
	// on their own, so a certificate being rotated on disk must not refuse
	// a reload of the rest.
	if err := f.checkServerTLS(); err != nil {
		return nil, fmt.Errorf("config: %s: %w", path, err)
	}
	return f, nil
}

// loadData is ParseFile plus the reading of the backend TLS files.
func loadData(path string, data []byte) (*File, error) {
	f, err := ParseFile(path, data)
	if err != nil {
		return nil, err
	}
	if err := f.checkFiles(); err != nil {
		return nil, fmt.Errorf("config: %s: %w", path, err)
	}
	return f, nil
}

// ParseFile checks data as a configuration file named name. Unknown fields
// are errors, and every error names the line and the field.
func ParseFile(name string, data []byte) (*File, error) {
	f, err := parseFile(data)
	if err != nil {
		if name == "" {
			return nil, fmt.Errorf("config: %w", err)
		}
		return nil, fmt.Errorf("config: %s: %w", name, err)
	}
	f.Path, f.raw = name, data
	return f, nil
}

// discardLogger takes the logs of the clusters built only to check them.
var discardLogger = slog.New(slog.DiscardHandler)

// yamlInType matches the Go type names in yaml.v3's messages,
// yamlLineRE the line number that starts each, and yamlValueRE the value
// a "cannot unmarshal" message quotes.
var (
	yamlInType  = regexp.MustCompile(` in type [\w.]+`)
	yamlLineRE  = regexp.MustCompile(`^line (\d+): `)
	yamlValueRE = regexp.MustCompile("cannot unmarshal \\S+ `([^`]*)`")
)

func parseFile(data []byte) (*File, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, cleanYAMLError(nil, err)
	}
	f := new(File)
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(f); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("empty file")
		}
		return nil, cleanYAMLError(&root, err)
	}
	if err := f.check(&root); err != nil {
		return nil, err
	}
	return f, nil
}

// cleanYAMLError turns yaml.v3's messages into ours: each keeps its line,
// gains the field's path, and loses the Go type names of this package.
func cleanYAMLError(root *yaml.Node, err error) error {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return errors.New(strings.TrimPrefix(err.Error(), "yaml: "))
	}
	msgs := make([]string, 0, len(te.Errors))
	for _, m := range te.Errors {
		m = yamlInType.ReplaceAllString(m, "")
		m = strings.ReplaceAll(m, "into time.Duration", "as a duration (like 1s or 250ms)")
		if sm := yamlLineRE.FindStringSubmatch(m); sm != nil && root != nil {
			line, _ := strconv.Atoi(sm[1])
			// The value the message quotes tells apart the fields of a
			// line in flow style ({name: a, weight: 0.5}).
			path := ""
			if vm := yamlValueRE.FindStringSubmatch(m); vm != nil {
				path = pathAtLine(root, line, vm[1])
			}
			if path == "" {
				path = pathAtLine(root, line, "")
			}
			if path != "" && !strings.Contains(m, "field ") {
				m = fmt.Sprintf("line %d: %s: %s", line, path, m[len(sm[0]):])
			}
		}
		msgs = append(msgs, m)
	}
	return errors.New(strings.Join(msgs, "; "))
}

// pathAtLine returns the path (as fieldName writes it) of the scalar value
// that starts at line, the first whose value is value if that is not "",
// or "" if none does. A value as yaml.v3 quotes one of more than 10 bytes,
// its first 7 and "...", matches the values that start so.
func pathAtLine(root *yaml.Node, line int, value string) string {
	cut, cutOK := strings.CutSuffix(value, "...")
	cutOK = cutOK && len(cut) == 7
	is := func(v string) bool {
		return value == "" || v == value || cutOK && len(v) > 10 && strings.HasPrefix(v, cut)
	}
	at := func(v *yaml.Node) bool {
		return v.Kind == yaml.ScalarNode && v.Line == line && is(v.Value)
	}
	var walk func(n *yaml.Node, path []any) []any
	walk = func(n *yaml.Node, path []any) []any {
		switch n.Kind {
		case yaml.DocumentNode:
			for _, c := range n.Content {
				if p := walk(c, path); p != nil {
					return p
				}
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				k, v := n.Content[i], n.Content[i+1]
				p := append(append([]any(nil), path...), k.Value)
				if at(v) {
					return p
				}
				if q := walk(v, p); q != nil {
					return q
				}
			}
		case yaml.SequenceNode:
			for i, v := range n.Content {
				p := append(append([]any(nil), path...), i)
				if at(v) {
					return p
				}
				if q := walk(v, p); q != nil {
					return q
				}
			}
		}
		return nil
	}
	return fieldName(walk(root, nil)...)
}

// fieldError is a semantic error at a field of the file.
type fieldError struct {
	line  int
	field string
	msg   string
}

func (e *fieldError) Error() string {
	if e.line == 0 {
		return fmt.Sprintf("%s: %s", e.field, e.msg)
	}
	return fmt.Sprintf("line %d: %s: %s", e.line, e.field, e.msg)
}

// lineOf returns the line of the node at path (mapping keys and sequence
// indexes) under root, or of the deepest node on the way that exists.
func lineOf(root *yaml.Node, path ...any) int {
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := n.Line
	for _, p := range path {
		var next *yaml.Node
		switch p := p.(type) {
		case string:
			if n.Kind == yaml.MappingNode {
				for i := 0; i+1 < len(n.Content); i += 2 {
					if n.Content[i].Value == p {
						next = n.Content[i+1]
						line = n.Content[i].Line
					}
				}
			}
		case int:
			if n.Kind == yaml.SequenceNode && p < len(n.Content) {
				next = n.Content[p]
				line = next.Line
			}
		}
		if next == nil {
			return line
		}
		n = next
	}
	return line
}

// fieldName renders path as routes[1].match.service.
func fieldName(path ...any) string {
	var b strings.Builder
	for _, p := range path {
		switch p := p.(type) {
		case string:
			if b.Len() > 0 {
				b.WriteByte('.')
			}
			b.WriteString(p)
		case int:
			b.WriteString("[" + strconv.Itoa(p) + "]")
		}
	}
	return b.String()
}

// check validates what the decoder cannot: references, ranges, and what
// the packages themselves would refuse (it builds each cluster, which
// starts nothing).
func (f *File) check(root *yaml.Node) error {
	errAt := func(msg string, path ...any) error {
		return &fieldError{line: lineOf(root, path...), field: fieldName(path...), msg: msg}
	}
	if f.Engine != "" && f.Engine != EngineFrame && f.Engine != EngineGRPCProxy {
		return errAt(fmt.Sprintf("unknown engine %q (want %s or %s)", f.Engine, EngineFrame, EngineGRPCProxy), "engine")
	}
	if f.DrainTimeout < 0 {
		return errAt("must not be negative", "drain_timeout")
	}
	for _, d := range []struct {
		key string
		v   time.Duration
	}{
		{"connect_timeout", f.Proxy.ConnectTimeout},
		{"handshake_timeout", f.Proxy.HandshakeTimeout},
		{"backend_keepalive_timeout", f.Proxy.BackendKeepaliveTimeout},
	} {
		if d.v < 0 {
			// As the flags, which must be positive: a negative value
			// silently meant the default.
			return errAt("must not be negative (0: the default)", "proxy", d.key)
		}
	}
	if f.Proxy.BackendPendingTimeout < 0 {
		// As --backend-pending-timeout: a wait must be bounded, and a
		// negative value silently meant the default.
		return errAt("must not be negative (0: the default, 5s)", "proxy", "backend_pending_timeout")
	}
	if t := f.TLS; t != nil && (t.Cert == "" || t.Key == "") {
		return errAt("cert and key are both required", "tls")
	}
	if err := checkBackendTLS(f.BackendTLS, errAt, "backend_tls"); err != nil {
		return err
	}
	if err := checkRetryOn(f.Proxy.RetryOn, errAt, "proxy", "retry_on"); err != nil {
		return err
	}
	if n := f.Proxy.RetryBudget; n != nil && *n < 0 {
		// proxy.Config takes a negative budget for none.
		return errAt("must not be negative (0: no UNAVAILABLE answer is retried)", "proxy", "retry_budget")
	}
	if r := f.Proxy.RetryBudgetRatio; r != nil && *r <= 0 {
		// gRFC A6: token_ratio must be greater than 0. A 0 silently
		// meant the default (proxy.Config's 0).
		return errAt("must be positive (gRFC A6; absent: the default, 0.1)", "proxy", "retry_budget_ratio")
	}
	pc := f.proxyConfig()
	pc.Picker = proxy.PickerFunc(func(context.Context, string) (string, func(error), error) { return "", nil, nil })
	pc.Logger = discardLogger
	if _, err := proxy.New(pc); err != nil { // New starts nothing
		return errAt(err.Error(), "proxy")
	}
	if len(f.Clusters) == 0 {
		return errAt("at least one cluster is required", "clusters")
	}
	names := map[string]bool{}
	for i, c := range f.Clusters {
		switch {
		case c.Name == "":
			return errAt("required", "clusters", i, "name")
		case names[c.Name]:
			return errAt(fmt.Sprintf("cluster %q is defined twice", c.Name), "clusters", i, "name")
		case len(c.Targets) == 0:
			return errAt("at least one target is required", "clusters", i, "targets")
		case c.Policy != "" && !contains(director.Policies(), c.Policy):
			return errAt(fmt.Sprintf("unknown policy %q (want one of %s)", c.Policy, strings.Join(director.Policies(), ", ")), "clusters", i, "policy")
		}
		for _, r := range []struct {
			key string
			reg *fileRegistry
		}{{"etcd", c.Etcd}, {"zookeeper", c.ZooKeeper}} {
			if field, msg := r.reg.check(); msg != "" {
				path := []any{"clusters", i, r.key}
				if field != "" {
					path = append(path, field)
				}
				return errAt(msg, path...)
			}
		}
		names[c.Name] = true
		if err := checkBackendTLS(c.BackendTLS, errAt, "clusters", i, "backend_tls"); err != nil {
			return err
		}
		if r := c.Retry; r != nil {
			if r.RetryOn != nil {
				if err := checkRetryOn(*r.RetryOn, errAt, "clusters", i, "retry", "retry_on"); err != nil {
					return err
				}
			}
			switch {
			case r.Budget != nil && *r.Budget < 0:
				return errAt("must not be negative (0: no UNAVAILABLE answer is retried)", "clusters", i, "retry", "budget")
			case r.BudgetRatio != nil && *r.BudgetRatio <= 0:
				// As proxy.retry_budget_ratio: 0 silently took the proxy's.
				return errAt("must be positive (gRFC A6; absent: proxy.retry_budget_ratio)", "clusters", i, "retry", "budget_ratio")
			}
		}
		if f.Engine == EngineGRPCProxy && !reflect.DeepEqual(f.backendTLSOf(c), f.BackendTLS) {
			return errAt("a cluster's own backend_tls needs the frame engine (grpc-proxy dials every cluster alike)", "clusters", i, "backend_tls")
		}
		cfg := f.clusterConfig(c)
		cfg.Logger = discardLogger
		cfg.BackendTLS = nil                // its files are read by checkFiles
		if _, err := New(cfg); err != nil { // starts nothing
			var te *TargetError
			if errors.As(err, &te) {
				return errAt(te.Err.Error(), "clusters", i, "targets")
			}
			return errAt(err.Error(), "clusters", i)
		}
	}
	if len(f.Routes) == 0 {
		return errAt("at least one route is required (a route with no match takes every call)", "routes")
	}
	routeNames := map[string]bool{}
	for i, r := range f.Routes {
		if err := checkRouteClusters(r, names, errAt, i); err != nil {
			return err
		}
		if r.Timeout < 0 {
			return errAt("must not be negative (0: no route timeout)", "routes", i, "timeout")
		}
		if name := f.routeName(i); routeNames[name] {
			return errAt(fmt.Sprintf("route %q is defined twice", name), "routes", i, "name")
		} else {
			routeNames[name] = true
		}
		if s := r.Match.Service; strings.Contains(strings.Trim(s, "/"), "/") {
			return errAt(fmt.Sprintf("%q is not a service name (pkg.Service); use method_prefix for methods", s), "routes", i, "match", "service")
		}
		for j, h := range r.Match.Headers {
			n := 0
			for _, set := range []bool{h.Exact != nil, h.Prefix != nil, h.Present} {
				if set {
					n++
				}
			}
			switch {
			case h.Name == "":
				return errAt("required", "routes", i, "match", "headers", j, "name")
			case strings.HasPrefix(h.Name, ":"):
				return errAt("pseudo-headers cannot be matched", "routes", i, "match", "headers", j, "name")
			case n != 1:
				return errAt("give exactly one of exact, prefix, present", "routes", i, "match", "headers", j)
			}
		}
		if rl := r.RateLimit; rl != nil {
			if math.IsNaN(rl.Rate) || math.IsInf(rl.Rate, 0) {
				// NaN passes the check below and admits every call.
				return errAt("must be a finite number (calls per second)", "routes", i, "rate_limit", "rate")
			}
			if rl.Rate <= 0 {
				return errAt("must be positive (calls per second)", "routes", i, "rate_limit", "rate")
			}
			if rl.Burst < 0 {
				return errAt("must not be negative", "routes", i, "rate_limit", "burst")
			}
			if rl.Burst > math.MaxInt32 {
				// As Envoy's token bucket (max_tokens, a uint32): a
				// larger one is no limit, and is most likely a typo.
				return errAt("must be at most 2147483647 (2^31-1)", "routes", i, "rate_limit", "burst")
			}
		}
	}
	return nil
}

// checkRouteClusters checks where route i sends its calls: one known
// cluster, or known weighted clusters, each once, whose weights are not
// negative and add up to more than 0.
func checkRouteClusters(r fileRoute, names map[string]bool, errAt func(string, ...any) error, i int) error {
	switch {
	case r.Cluster != "" && r.Clusters != nil:
		return errAt("give cluster or clusters, not both", "routes", i, "clusters")
	case r.Clusters == nil:
		if r.Cluster == "" {
			return errAt("required: a cluster, or clusters with weights", "routes", i, "cluster")
		}
		if !names[r.Cluster] {
			return errAt(fmt.Sprintf("unknown cluster %q", r.Cluster), "routes", i, "cluster")
		}
		return nil
	case len(r.Clusters) == 0:
		return errAt("at least one weighted cluster is required", "routes", i, "clusters")
	}
	seen := map[string]bool{}
	total := 0
	for j, wc := range r.Clusters {
		switch {
		case wc.Name == "":
			return errAt("required", "routes", i, "clusters", j, "name")
		case !names[wc.Name]:
			return errAt(fmt.Sprintf("unknown cluster %q", wc.Name), "routes", i, "clusters", j, "name")
		case seen[wc.Name]:
			return errAt(fmt.Sprintf("cluster %q is listed twice", wc.Name), "routes", i, "clusters", j, "name")
		case wc.Weight == nil:
			return errAt("required: a whole number, 0 or more (0: no calls)", "routes", i, "clusters", j, "weight")
		case *wc.Weight < 0:
			return errAt("must not be negative", "routes", i, "clusters", j, "weight")
		case int(*wc.Weight) > maxTotalWeight-total:
			return errAt(fmt.Sprintf("the route's weights must add up to at most %d", maxTotalWeight), "routes", i, "clusters", j, "weight")
		}
		seen[wc.Name] = true
		total += int(*wc.Weight)
	}
	if total == 0 {
		return errAt("the weights add up to 0: at least one must be above 0", "routes", i, "clusters")
	}
	return nil
}

// checkBackendTLS checks the backend_tls at path: its required fields,
// and that its files load.
func checkBackendTLS(t *fileBackendTL, errAt func(string, ...any) error, path ...any) error {
	if t == nil {
		return nil
	}
	switch {
	case t.CA == "":
		return errAt("required: the CA backend certificates must chain to", append(path, "ca")...)
	case (t.Cert == "") != (t.Key == ""):
		return errAt("cert and key go together", append(path, "cert")...)
	}
	return nil
}

// checkFiles reads the backend TLS files f names, the file's and each
// cluster's, and names the setting of those that do not load.
func (f *File) checkFiles() error {
	var root yaml.Node
	if err := yaml.Unmarshal(f.raw, &root); err != nil {
		return err
	}
	errAt := func(msg string, path ...any) error {
		return &fieldError{line: lineOf(&root, path...), field: fieldName(path...), msg: msg}
	}
	load := func(t *fileBackendTL, path ...any) error {
		if t == nil {
			return nil
		}
		bt := BackendTLS{CAFile: t.CA, ServerName: t.ServerName, CertFile: t.Cert, KeyFile: t.Key}
		if _, err := newBackendTLS(bt, discardLogger); err != nil {
			return errAt(err.Error(), path...)
		}
		return nil
	}
	if err := load(f.BackendTLS, "backend_tls"); err != nil {
		return err
	}
	for i, c := range f.Clusters {
		if err := load(c.BackendTLS, "clusters", i, "backend_tls"); err != nil {
			return err
		}
	}
	return nil
}

// checkServerTLS reads the listener's TLS files (tls), as NewServer
// will, and names the setting and its line of those that do not load:
// NewServer's error named neither.
func (f *File) checkServerTLS() error {
	t := f.TLS
	if t == nil {
		return nil
	}
	var root yaml.Node
	if err := yaml.Unmarshal(f.raw, &root); err != nil {
		return err
	}
	errAt := func(msg string, path ...any) error {
		return &fieldError{line: lineOf(&root, path...), field: fieldName(path...), msg: msg}
	}
	// The certificate and key are one pair: either may be the bad one.
	if _, err := newServerTLS(ServerTLS{CertFile: t.Cert, KeyFile: t.Key}, discardLogger); err != nil {
		return errAt(err.Error(), "tls")
	}
	if t.ClientCA != "" {
		if _, err := newServerTLS(ServerTLS{CertFile: t.Cert, KeyFile: t.Key, ClientCAFile: t.ClientCA}, discardLogger); err != nil {
			return errAt(err.Error(), "tls", "client_ca")
		}
	}
	return nil
}

// checkRetryOn checks each method of the retry_on list at path, so that an
// error names its entry.
func checkRetryOn(methods []string, errAt func(string, ...any) error, path ...any) error {
	for j, m := range methods {
		if _, err := proxy.NewUpstream(proxy.UpstreamConfig{RetryOn: []string{m}}); err != nil {
			return errAt(strings.TrimPrefix(err.Error(), "proxy: "), append(path, j)...)
		}
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// routeName is route i's name: its own, or "route-i".
func (f *File) routeName(i int) string {
	if n := f.Routes[i].Name; n != "" {
		return n
	}
	return "route-" + strconv.Itoa(i)
}

// clusterConfig turns one cluster's settings into New's.
func (f *File) clusterConfig(c fileCluster) Config {
	cfg := Config{
		Name:          c.Name,
		Targets:       c.Targets,
		DNSRefresh:    c.DNSRefresh,
		DNSRespectTTL: c.DNSRespectTTL,
		Director: director.Config{
			Policy:              c.Policy,
			ChoiceCount:         c.ChoiceCount,
			HashHeader:          c.HashHeader,
			RingSize:            c.RingSize,
			SlowStart:           c.SlowStart,
			HealthCheckInterval: c.HealthCheck.Interval,
			HealthCheckTimeout:  c.HealthCheck.Timeout,
			HealthCheckService:  c.HealthCheck.Service,
			HealthyThreshold:    c.HealthCheck.HealthyThreshold,
			UnhealthyThreshold:  c.HealthCheck.UnhealthyThreshold,
			EjectAfter:          c.Ejection.After,
			BaseEjection:        c.Ejection.Base,
			MaxEjection:         c.Ejection.Max,
			MaxEjectionPercent:  c.Ejection.MaxPercent,
		},
	}
	if r := c.Etcd; r != nil {
		cfg.Etcd = resolver.EtcdOptions{CAFile: r.CA, CertFile: r.Cert, KeyFile: r.Key, Username: r.Username, Password: r.password()}
	}
	if r := c.ZooKeeper; r != nil {
		cfg.ZK = resolver.ZKOptions{CAFile: r.CA, CertFile: r.Cert, KeyFile: r.Key, Username: r.Username, Password: r.password()}
	}
	if t := f.backendTLSOf(c); t != nil {
		cfg.BackendTLS = &BackendTLS{CAFile: t.CA, ServerName: t.ServerName, CertFile: t.Cert, KeyFile: t.Key}
	}
	cfg.Retry = f.retryOf(c)
	return cfg
}

// backendTLSOf returns cluster c's backend TLS: its own, or the file's.
func (f *File) backendTLSOf(c fileCluster) *fileBackendTL {
	if c.BackendTLS != nil {
		return c.BackendTLS
	}
	return f.BackendTLS
}

// retryOf returns cluster c's retry policy: its own fields, the others
// from proxy.
func (f *File) retryOf(c fileCluster) Retry {
	p := f.Proxy
	r := Retry{On: p.RetryOn, MaxRetries: retriesOf(p.MaxRetries), Budget: budgetOf(p.RetryBudget), BudgetRatio: ratioOf(p.RetryBudgetRatio)}
	if cr := c.Retry; cr != nil {
		if cr.RetryOn != nil {
			r.On = *cr.RetryOn
		}
		if cr.MaxRetries != nil {
			r.MaxRetries = retriesOf(cr.MaxRetries)
		}
		if cr.Budget != nil {
			r.Budget = budgetOf(cr.Budget)
		}
		if cr.BudgetRatio != nil {
			r.BudgetRatio = *cr.BudgetRatio
		}
	}
	return r
}

// retriesOf is proxy.Config's MaxRetries for a max_retries field: left
// out, the default (0); 0, none (-1), as Envoy's num_retries: 0 and
// --max-retries 0 mean. proxy.Config's own 0 is its default, 2, which a
// file's "max_retries: 0" silently gave before.
func retriesOf(n *int) int {
	switch {
	case n == nil:
		return 0
	case *n == 0:
		return -1
	}
	return *n
}

// budgetOf is proxy.Config's RetryBudget for a retry_budget (or a
// cluster's retry.budget) field: left out, the default (0); 0, a bucket
// of no tokens (-1), so that no UNAVAILABLE answer is retried.
// proxy.Config's own 0 is its default, 10 tokens, which a file's
// "retry_budget: 0" silently gave before (and a cluster's "budget: 0"
// silently took the proxy's).
func budgetOf(n *int) int {
	switch {
	case n == nil:
		return 0
	case *n == 0:
		return -1
	}
	return *n
}

// ratioOf is proxy.Config's RetryBudgetRatio for a retry_budget_ratio
// (or a cluster's retry.budget_ratio) field: left out, the default (0).
// validate refuses a ratio of 0 or less (gRFC A6 wants it positive).
func ratioOf(r *float64) float64 {
	if r == nil {
		return 0
	}
	return *r
}

// password reads the password from the environment.
func (r *fileRegistry) password() string {
	if r.PasswordEnv == "" {
		return ""
	}
	return os.Getenv(r.PasswordEnv)
}

// proxyConfig returns the frame engine's settings from the file; zero
// values select the proxy's defaults.
func (f *File) proxyConfig() proxy.Config {
	p := f.Proxy
	return proxy.Config{
		ConnectTimeout:            p.ConnectTimeout,
		HandshakeTimeout:          p.HandshakeTimeout,
		MaxConcurrentStreams:      p.MaxConcurrentStreams,
		MaxConnections:            p.MaxConnections,
		IdleTimeout:               p.IdleTimeout,
		RequestIdleTimeout:        p.RequestIdleTimeout,
		WriteTimeout:              p.WriteTimeout,
		MaxStreams:                p.MaxStreams,
		MaxStreamsPerBackend:      p.MaxStreamsPerBackend,
		RetryOn:                   p.RetryOn,
		MaxRetries:                retriesOf(p.MaxRetries),
		NoLoopHeader:              p.LoopHeader != nil && !*p.LoopHeader,
		RetryBudget:               budgetOf(p.RetryBudget),
		RetryBudgetRatio:          ratioOf(p.RetryBudgetRatio),
		RetryBufferSize:           p.RetryBuffer,
		ResponseHoldback:          p.ResponseHoldback,
		MaxBackendConns:           p.MaxBackendConns,
		MaxBackendPending:         p.MaxBackendPending,
		BackendPendingTimeout:     p.BackendPendingTimeout,
		BackendIdleTimeout:        p.BackendIdleTimeout,
		BackendKeepaliveTime:      p.BackendKeepaliveTime,
		BackendKeepaliveTimeout:   p.BackendKeepaliveTimeout,
		MaxHeaderListSize:         p.MaxHeaderListSize,
		MaxResponseHeaderListSize: p.MaxResponseHeaderListSize,
		MaxConnBufferedBytes:      p.MaxConnBuffer,
		BackendStreamWindow:       p.BackendStreamWindow,
		BackendMaxStreamWindow:    p.BackendStreamWindowMax,
	}
}

// ServerConfig returns the settings of a server for f: [NewServer] builds
// every cluster and the route table from it. The caller adds the logger,
// the metrics registry (if [File.MetricsOn]) and OnDrain.
func (f *File) ServerConfig() ServerConfig {
	sc := ServerConfig{
		Engine:         f.Engine,
		Proxy:          f.proxyConfig(),
		MaxMessageSize: f.Proxy.MaxMessageSize,
		DrainTimeout:   f.DrainTimeout,
		File:           f,
	}
	if t := f.TLS; t != nil {
		sc.TLS = &ServerTLS{CertFile: t.Cert, KeyFile: t.Key, ClientCAFile: t.ClientCA}
	}
	return sc
}

// MetricsOn reports whether the file asks for metrics (the default).
func (f *File) MetricsOn() bool { return f.Metrics == nil || *f.Metrics }

// restartOnly returns the names of the settings that differ between f and
// g and that a reload cannot apply.
func (f *File) restartOnly(g *File) []string {
	var out []string
	for _, d := range []struct {
		name string
		a, b any
	}{
		{"listen", f.Listen, g.Listen},
		{"admin_listen", f.AdminListen, g.AdminListen},
		{"engine", f.Engine, g.Engine},
		{"drain_timeout", f.DrainTimeout, g.DrainTimeout},
		{"metrics", f.MetricsOn(), g.MetricsOn()},
		{"tls", f.TLS, g.TLS},
		{"proxy", f.Proxy.restartOnly(), g.Proxy.restartOnly()},
	} {
		if !reflect.DeepEqual(d.a, d.b) {
			out = append(out, d.name)
		}
	}
	return out
}

// restartOnly returns p without the retry policy, which clusters take
// on reload: what of proxy a reload cannot apply.
func (p fileProxy) restartOnly() fileProxy {
	p.RetryOn, p.MaxRetries, p.RetryBudget, p.RetryBudgetRatio = nil, nil, nil, nil
	return p
}
