package kubernetes

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/streamlb/streamlb/cluster"
)

// The names the demo is built from. The manifests, README.md and the
// proxy's --backend flag all depend on them.
const (
	demoNamespace  = "streamlb-demo"
	backendName    = "grpc-echo"     // Deployment and headless Service
	proxyName      = "streamlb"      // Deployment, Service and PodDisruptionBudget
	loadJobName    = "streamlb-load" // Job
	sidecarJobName = "sidecar-load"  // Job with streamlb as a native sidecar
	imageName      = "streamlb"      // image every proxy container names; kustomization.yaml rewrites it
	devImageName   = "streamlb-dev"  // image of the testserver and loadtest containers (the Dockerfile's dev target)
	nonRootUID     = 65532           // distroless :nonroot user, also USER in the Dockerfile
	clusterDomain  = "svc.cluster.local"
	kustomizeFile  = "kustomization.yaml"
	monitoringDir  = "monitoring"      // kustomization with the PodMonitor, a CRD
	tlsSecretName  = "streamlb-tls"    // kubernetes.io/tls Secret the README has you create
	configMapName  = "streamlb-config" // ConfigMap holding the proxy's streamlb.yaml
	dockerfilePath = "../../Dockerfile"
)

// typeKey identifies a manifest's type as its apiVersion and kind.
type typeKey struct{ apiVersion, kind string }

// kinds maps every type the demo may use to the typed k8s.io/api struct its
// documents decode into. A document of any other type fails the test.
var kinds = map[typeKey]func() any{
	{"v1", "Namespace"}:                  func() any { return new(corev1.Namespace) },
	{"v1", "Service"}:                    func() any { return new(corev1.Service) },
	{"v1", "ConfigMap"}:                  func() any { return new(corev1.ConfigMap) },
	{"apps/v1", "Deployment"}:            func() any { return new(appsv1.Deployment) },
	{"batch/v1", "Job"}:                  func() any { return new(batchv1.Job) },
	{"policy/v1", "PodDisruptionBudget"}: func() any { return new(policyv1.PodDisruptionBudget) },
}

// decode decodes one YAML document strictly into the typed struct for its
// apiVersion and kind, and returns a pointer to that struct.
//
// Strict means what kube-apiserver's strict field validation (kubectl's
// default --validate=strict) means: YAMLToJSONStrict rejects duplicate keys,
// and sigs.k8s.io/json, the decoder the API server uses, rejects unknown
// fields and matches field names case-sensitively. encoding/json with
// DisallowUnknownFields would accept `Replicas:` for `replicas:`, because it
// matches names case-insensitively; the API server would not.
func decode(doc []byte) (any, error) {
	js, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, fmt.Errorf("yaml: %w", err)
	}
	var tm struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := kjson.UnmarshalCaseSensitivePreserveInts(js, &tm); err != nil {
		return nil, fmt.Errorf("reading apiVersion and kind: %w", err)
	}
	newObj, ok := kinds[typeKey{tm.APIVersion, tm.Kind}]
	if !ok {
		return nil, fmt.Errorf("unknown kind %q in apiVersion %q", tm.Kind, tm.APIVersion)
	}
	obj := newObj()
	strictErrs, err := kjson.UnmarshalStrict(js, obj)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", tm.Kind, err)
	}
	if len(strictErrs) > 0 {
		return nil, fmt.Errorf("%s: %w", tm.Kind, errors.Join(strictErrs...))
	}
	return obj, nil
}

// splitDocuments splits a multi-document YAML file on its `---` separator
// lines and drops documents that hold only comments and blank lines.
func splitDocuments(data string) []string {
	var docs []string
	for _, doc := range strings.Split("\n"+data, "\n---") {
		for _, line := range strings.Split(doc, "\n") {
			if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
				docs = append(docs, doc)
				break
			}
		}
	}
	return docs
}

// manifests is every object in the directory's YAML files, by type and name.
type manifests struct {
	namespaces  map[string]*corev1.Namespace
	services    map[string]*corev1.Service
	deployments map[string]*appsv1.Deployment
	jobs        map[string]*batchv1.Job
	pdbs        map[string]*policyv1.PodDisruptionBudget
	configMaps  map[string]*corev1.ConfigMap
	// namespaced is every namespaced object, as "Kind/name", with its
	// metadata.namespace.
	namespaced map[string]string
}

// yamlFiles returns the names of the directory's YAML files other than
// kustomization.yaml, sorted.
func yamlFiles(t *testing.T) []string {
	t.Helper()
	return yamlFilesIn(t, ".")
}

// yamlFilesIn returns the names of dir's YAML files other than
// kustomization.yaml, sorted.
func yamlFilesIn(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || name == kustomizeFile {
			continue
		}
		if ext := filepath.Ext(name); ext == ".yaml" || ext == ".yml" {
			files = append(files, name)
		}
	}
	if len(files) == 0 {
		t.Fatal("no YAML files in the directory")
	}
	return files
}

// load decodes every document of every YAML file in the directory, failing
// the test on the first document that does not decode strictly or whose
// kind and name repeat an earlier one.
func load(t *testing.T) *manifests {
	t.Helper()
	m := &manifests{
		namespaces:  map[string]*corev1.Namespace{},
		services:    map[string]*corev1.Service{},
		deployments: map[string]*appsv1.Deployment{},
		jobs:        map[string]*batchv1.Job{},
		pdbs:        map[string]*policyv1.PodDisruptionBudget{},
		configMaps:  map[string]*corev1.ConfigMap{},
		namespaced:  map[string]string{},
	}
	for _, file := range yamlFiles(t) {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range splitDocuments(string(data)) {
			obj, err := decode([]byte(doc))
			if err != nil {
				t.Fatalf("%s, document %d: %v", file, i+1, err)
			}
			var dup bool
			switch o := obj.(type) {
			case *corev1.Namespace:
				dup = add(m.namespaces, o.Name, o)
			case *corev1.Service:
				dup = add(m.services, o.Name, o)
				m.namespaced["Service/"+o.Name] = o.Namespace
			case *appsv1.Deployment:
				dup = add(m.deployments, o.Name, o)
				m.namespaced["Deployment/"+o.Name] = o.Namespace
			case *batchv1.Job:
				dup = add(m.jobs, o.Name, o)
				m.namespaced["Job/"+o.Name] = o.Namespace
			case *policyv1.PodDisruptionBudget:
				dup = add(m.pdbs, o.Name, o)
				m.namespaced["PodDisruptionBudget/"+o.Name] = o.Namespace
			case *corev1.ConfigMap:
				dup = add(m.configMaps, o.Name, o)
				m.namespaced["ConfigMap/"+o.Name] = o.Namespace
			default:
				t.Fatalf("%s, document %d: decoded to %T, which load does not handle", file, i+1, obj)
			}
			if dup {
				t.Fatalf("%s, document %d: %T is defined twice", file, i+1, obj)
			}
		}
	}
	return m
}

// add stores v under name and reports whether name was already taken.
func add[V any](m map[string]V, name string, v V) (dup bool) {
	_, dup = m[name]
	m[name] = v
	return dup
}

// workload is a pod template and where it came from.
type workload struct {
	name   string // "Deployment/grpc-echo"
	labels map[string]string
	spec   *corev1.PodSpec
	// probed is whether the pods serve traffic and so need readiness and
	// liveness probes. A Job's pod runs to completion and needs neither.
	probed bool
}

func (m *manifests) workloads() []workload {
	var ws []workload
	for _, name := range sortedKeys(m.deployments) {
		d := m.deployments[name]
		ws = append(ws, workload{"Deployment/" + name, d.Spec.Template.Labels, &d.Spec.Template.Spec, true})
	}
	for _, name := range sortedKeys(m.jobs) {
		j := m.jobs[name]
		ws = append(ws, workload{"Job/" + name, j.Spec.Template.Labels, &j.Spec.Template.Spec, false})
	}
	return ws
}

// deref formats the value p points to, or "unset" for nil.
func deref[T any](p *T) string {
	if p == nil {
		return "unset"
	}
	return fmt.Sprint(*p)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// selects reports whether a label selector given as a plain map (Service
// spec.selector, or matchLabels) matches labels. An empty selector selects
// nothing here: none of the demo's selectors should be empty.
func selects(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// flagValues returns every value given for the long flag name in args, in
// either the "--name value" or the "--name=value" form, as urfave/cli
// accepts them.
func flagValues(args []string, name string) []string {
	var vals []string
	for i := 0; i < len(args); i++ {
		switch {
		case args[i] == "--"+name && i+1 < len(args):
			vals = append(vals, args[i+1])
			i++
		case strings.HasPrefix(args[i], "--"+name+"="):
			vals = append(vals, strings.TrimPrefix(args[i], "--"+name+"="))
		}
	}
	return vals
}

// flagValue returns the single value of flag name in args, failing the test
// if it is missing or repeated.
func flagValue(t *testing.T, args []string, name string) string {
	t.Helper()
	vals := flagValues(args, name)
	if len(vals) != 1 {
		t.Fatalf("args %q: got %d values for --%s, want 1", args, len(vals), name)
	}
	return vals[0]
}

// configFile returns the configuration file a `streamlb proxy --config
// FILE` container c of spec reads, parsed by the proxy's own parser, and
// the ConfigMap it comes from; nil if c takes no --config. The file must
// come from a ConfigMap mounted as a whole directory (a subPath mount
// would never see an update, so the proxy would never reload it).
func configFile(t *testing.T, m *manifests, spec *corev1.PodSpec, c corev1.Container) (*cluster.File, *corev1.ConfigMap) {
	t.Helper()
	vals := flagValues(c.Args, "config")
	if len(vals) == 0 {
		return nil, nil
	}
	path := vals[0]
	for _, vm := range c.VolumeMounts {
		if vm.MountPath != filepath.Dir(path) {
			continue
		}
		if vm.SubPath != "" || vm.SubPathExpr != "" {
			t.Fatalf("--config %s: mounted with subPath, which the kubelet never updates", path)
		}
		i := slices.IndexFunc(spec.Volumes, func(v corev1.Volume) bool { return v.Name == vm.Name })
		if i < 0 || spec.Volumes[i].ConfigMap == nil {
			t.Fatalf("--config %s: volume %s is not a ConfigMap", path, vm.Name)
		}
		src := spec.Volumes[i].ConfigMap
		key := filepath.Base(path)
		if j := slices.IndexFunc(src.Items, func(kp corev1.KeyToPath) bool { return kp.Path == key }); j >= 0 {
			key = src.Items[j].Key
		}
		cm, ok := m.configMaps[src.Name]
		if !ok {
			t.Fatalf("--config %s: no ConfigMap %q", path, src.Name)
		}
		data, ok := cm.Data[key]
		if !ok {
			t.Fatalf("--config %s: ConfigMap %s has no key %q", path, cm.Name, key)
		}
		f, err := cluster.ParseFile("ConfigMap/"+cm.Name+"/"+key, []byte(data))
		if err != nil {
			t.Fatalf("--config %s: %v", path, err)
		}
		return f, cm
	}
	t.Fatalf("--config %s: no volume is mounted at %s", path, filepath.Dir(path))
	return nil, nil
}

// proxyArgs returns the command line of proxy container c of spec, with
// the settings of its --config file, if it has one, written as the flags
// that would say the same, so that checks of a setting hold for either
// form. A file's backend and DNS refresh are its one cluster's, when it
// has one cluster with one target.
func proxyArgs(t *testing.T, m *manifests, spec *corev1.PodSpec, c corev1.Container) []string {
	t.Helper()
	f, _ := configFile(t, m, spec, c)
	if f == nil {
		return c.Args
	}
	args := []string{"proxy", "--listen", f.Listen, "--admin-listen", f.AdminListen, "--drain-timeout", f.DrainTimeout.String()}
	if f.Listen == "" {
		args[2] = ":8080" // the file's default
	}
	if f.TLS != nil {
		args = append(args, "--tls-cert", f.TLS.Cert, "--tls-key", f.TLS.Key)
	}
	if !f.MetricsOn() {
		args = append(args, "--metrics=false")
	}
	if len(f.Clusters) == 1 && len(f.Clusters[0].Targets) == 1 {
		args = append(args, "--backend", f.Clusters[0].Targets[0], "--dns-refresh", f.Clusters[0].DNSRefresh.String())
	}
	return args
}

// servicePort returns the port of svc named name.
func servicePort(t *testing.T, svc *corev1.Service, name string) corev1.ServicePort {
	t.Helper()
	for _, p := range svc.Spec.Ports {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("Service %s has no port named %q", svc.Name, name)
	return corev1.ServicePort{}
}

// checkServiceAddr checks that addr (host:port) is the cluster DNS name of
// svc and the port of svc named portName.
func checkServiceAddr(t *testing.T, flag, addr string, svc *corev1.Service, portName string) {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s %q: %v", flag, addr, err)
	}
	if want := svc.Name + "." + svc.Namespace + "." + clusterDomain; host != want {
		t.Errorf("%s host: got %q, want %q (the DNS name of Service %s)", flag, host, want, svc.Name)
	}
	if want := strconv.Itoa(int(servicePort(t, svc, portName).Port)); port != want {
		t.Errorf("%s port: got %s, want %s (Service %s port %q)", flag, port, want, svc.Name, portName)
	}
}

func mustDeployment(t *testing.T, m *manifests, name string) *appsv1.Deployment {
	t.Helper()
	d, ok := m.deployments[name]
	if !ok {
		t.Fatalf("no Deployment %q", name)
	}
	return d
}

func mustService(t *testing.T, m *manifests, name string) *corev1.Service {
	t.Helper()
	s, ok := m.services[name]
	if !ok {
		t.Fatalf("no Service %q", name)
	}
	return s
}

// onlyContainer returns the single container of spec.
func onlyContainer(t *testing.T, owner string, spec *corev1.PodSpec) corev1.Container {
	t.Helper()
	if len(spec.Containers) != 1 {
		t.Fatalf("%s: got %d containers, want 1", owner, len(spec.Containers))
	}
	return spec.Containers[0]
}

func TestManifestsDecodeStrictly(t *testing.T) {
	t.Parallel()
	m := load(t)

	var got []string
	for name := range m.namespaces {
		got = append(got, "Namespace/"+name)
	}
	for obj := range m.namespaced {
		got = append(got, obj)
	}
	slices.Sort(got)
	want := []string{
		"ConfigMap/" + configMapName,
		"Deployment/" + backendName,
		"Deployment/" + proxyName,
		"Job/" + sidecarJobName,
		"Job/" + loadJobName,
		"Namespace/" + demoNamespace,
		"PodDisruptionBudget/" + proxyName,
		"Service/" + backendName,
		"Service/" + proxyName,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("objects (-want +got):\n%s", diff)
	}
	for obj, ns := range m.namespaced {
		if ns != demoNamespace {
			t.Errorf("%s: namespace %q, want %q", obj, ns, demoNamespace)
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	t.Parallel()
	const head = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n"
	tests := []struct {
		name    string
		doc     string
		wantErr string // "" if the document must decode
	}{
		{name: "valid", doc: head + "spec:\n  replicas: 2\n"},
		{name: "misspelt field", doc: head + "spec:\n  replicass: 2\n", wantErr: `unknown field "spec.replicass"`},
		{name: "field in wrong case", doc: head + "spec:\n  Replicas: 2\n", wantErr: `unknown field "spec.Replicas"`},
		{
			name:    "misspelt nested field",
			doc:     head + "spec:\n  template:\n    spec:\n      containers:\n        - name: c\n          ports:\n            - containerport: 80\n",
			wantErr: `unknown field "spec.template.spec.containers[0].ports[0].containerport"`,
		},
		{name: "field at wrong level", doc: head + "replicas: 2\n", wantErr: `unknown field "replicas"`},
		{name: "duplicate key", doc: head + "spec:\n  replicas: 2\n  replicas: 3\n", wantErr: `"replicas" already set`},
		{name: "wrong value type", doc: head + "spec:\n  replicas: two\n", wantErr: "cannot unmarshal"},
		{name: "unknown kind", doc: "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: x\n", wantErr: `unknown kind "StatefulSet"`},
		{name: "misspelt kind", doc: "apiVersion: apps/v1\nkind: Deploymnet\nmetadata:\n  name: x\n", wantErr: `unknown kind "Deploymnet"`},
		{name: "retired apiVersion", doc: "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata:\n  name: x\n", wantErr: `unknown kind "Deployment" in apiVersion "extensions/v1beta1"`},
		{name: "no kind", doc: "metadata:\n  name: x\n", wantErr: `unknown kind ""`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			obj, err := decode([]byte(tc.doc))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("decode: got error %v, want none", err)
				}
				d, ok := obj.(*appsv1.Deployment)
				if !ok || d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
					t.Fatalf("decode: got %#v, want a Deployment with 2 replicas", obj)
				}
				return
			}
			if err == nil {
				t.Fatalf("decode: got %T and no error, want an error containing %q", obj, tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("decode: got error %q, want it to contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestSplitDocuments(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   string
		want int
	}{
		{name: "one", in: "kind: A\n", want: 1},
		{name: "two", in: "kind: A\n---\nkind: B\n", want: 2},
		{name: "leading separator", in: "---\nkind: A\n", want: 1},
		{name: "comment-only documents dropped", in: "# head\n---\nkind: A\n---\n# tail\n\n", want: 1},
		{name: "separator with trailing comment", in: "kind: A\n--- # next\nkind: B\n", want: 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := len(splitDocuments(tc.in)); got != tc.want {
				t.Errorf("splitDocuments(%q): got %d documents, want %d", tc.in, got, tc.want)
			}
		})
	}
}

// TestBackendIsHeadless checks the chain the demo rests on: the proxy's
// --backend is dns:/// plus the cluster DNS name and port of a headless
// Service, and that Service selects the grpc-echo pods, so the name resolves
// to one address per ready pod.
func TestBackendIsHeadless(t *testing.T) {
	t.Parallel()
	m := load(t)
	svc := mustService(t, m, backendName)
	if svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("Service %s clusterIP: got %q, want %q (headless)", svc.Name, svc.Spec.ClusterIP, corev1.ClusterIPNone)
	}
	if svc.Spec.PublishNotReadyAddresses {
		t.Errorf("Service %s publishes not-ready addresses; the proxy would send calls to pods that are not ready", svc.Name)
	}
	backend := mustDeployment(t, m, backendName)
	if !selects(svc.Spec.Selector, backend.Spec.Template.Labels) {
		t.Errorf("Service %s selector %v does not match Deployment %s pod labels %v",
			svc.Name, svc.Spec.Selector, backend.Name, backend.Spec.Template.Labels)
	}

	pspec := &mustDeployment(t, m, proxyName).Spec.Template.Spec
	proxy := onlyContainer(t, "Deployment/"+proxyName, pspec)
	if len(proxy.Args) == 0 || proxy.Args[0] != "proxy" {
		t.Fatalf("proxy args: got %q, want the proxy subcommand first", proxy.Args)
	}
	args := proxyArgs(t, m, pspec, proxy)
	target := flagValue(t, args, "backend")
	addr, ok := strings.CutPrefix(target, "dns:///")
	if !ok {
		t.Fatalf("--backend %q: want the dns:/// scheme, so the proxy re-resolves the name", target)
	}
	checkServiceAddr(t, "--backend", addr, svc, "grpc")
	if _, err := time.ParseDuration(flagValue(t, args, "dns-refresh")); err != nil {
		t.Errorf("--dns-refresh: %v", err)
	}
}

// TestBackendNamesItself checks that each grpc-echo pod is named after its
// pod: behind the proxy the x-backend header is the only way to tell which
// pod served a call.
func TestBackendNamesItself(t *testing.T) {
	t.Parallel()
	m := load(t)
	c := onlyContainer(t, "Deployment/"+backendName, &mustDeployment(t, m, backendName).Spec.Template.Spec)
	if len(c.Args) == 0 || c.Args[0] != "testserver" {
		t.Fatalf("args: got %q, want the testserver subcommand first", c.Args)
	}
	if got, want := flagValue(t, c.Args, "name"), "$(POD_NAME)"; got != want {
		t.Errorf("--name: got %q, want %q", got, want)
	}
	i := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "POD_NAME" })
	if i < 0 {
		t.Fatal("no POD_NAME env var")
	}
	if from := c.Env[i].ValueFrom; from == nil || from.FieldRef == nil || from.FieldRef.FieldPath != "metadata.name" {
		t.Errorf("POD_NAME: got %+v, want valueFrom.fieldRef.fieldPath metadata.name", c.Env[i])
	}
}

// TestProxyAvailability checks what keeps the proxy up through rollouts,
// node drains and its own shutdown.
func TestProxyAvailability(t *testing.T) {
	t.Parallel()
	m := load(t)
	d := mustDeployment(t, m, proxyName)
	if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
		t.Errorf("replicas: got %s, want at least 2", deref(d.Spec.Replicas))
	}
	if s := d.Spec.Strategy; s.Type != appsv1.RollingUpdateDeploymentStrategyType || s.RollingUpdate == nil ||
		s.RollingUpdate.MaxUnavailable == nil || s.RollingUpdate.MaxUnavailable.IntValue() != 0 {
		t.Errorf("strategy: got %+v, want RollingUpdate with maxUnavailable 0", s)
	}

	spec := &d.Spec.Template.Spec
	c := onlyContainer(t, "Deployment/"+proxyName, spec)
	drain, err := time.ParseDuration(flagValue(t, proxyArgs(t, m, spec, c), "drain-timeout"))
	if err != nil {
		t.Fatalf("--drain-timeout: %v", err)
	}
	if spec.TerminationGracePeriodSeconds == nil {
		t.Fatal("terminationGracePeriodSeconds is not set")
	}
	// The preStop sleep keeps the pod serving while its endpoints are
	// removed; SIGTERM, and so the drain, only comes after it, and the grace
	// period covers both.
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Sleep == nil {
		t.Fatalf("lifecycle: got %+v, want a preStop sleep action", c.Lifecycle)
	}
	preStop := time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
	if preStop <= 0 {
		t.Errorf("preStop sleep: got %v, want more than 0", preStop)
	}
	if grace := time.Duration(*spec.TerminationGracePeriodSeconds) * time.Second; grace <= preStop+drain {
		t.Errorf("terminationGracePeriodSeconds %v is not longer than preStop sleep %v + --drain-timeout %v; SIGKILL would cut the drain short", grace, preStop, drain)
	}

	if a := spec.Affinity; a == nil || a.PodAntiAffinity == nil ||
		!slices.ContainsFunc(a.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution, func(w corev1.WeightedPodAffinityTerm) bool {
			term := w.PodAffinityTerm
			return term.TopologyKey == corev1.LabelHostname && term.LabelSelector != nil &&
				selects(term.LabelSelector.MatchLabels, d.Spec.Template.Labels)
		}) {
		t.Errorf("affinity: got %+v, want a preferred podAntiAffinity term over %s selecting the proxy's own pods", spec.Affinity, corev1.LabelHostname)
	}

	pdb, ok := m.pdbs[proxyName]
	if !ok {
		t.Fatalf("no PodDisruptionBudget %q", proxyName)
	}
	if pdb.Spec.Selector == nil || !selects(pdb.Spec.Selector.MatchLabels, d.Spec.Template.Labels) {
		t.Errorf("PodDisruptionBudget %s selector %v does not match the proxy's pod labels %v", pdb.Name, pdb.Spec.Selector, d.Spec.Template.Labels)
	}
	if mn := pdb.Spec.MinAvailable; mn == nil || mn.IntValue() != 1 {
		t.Errorf("PodDisruptionBudget %s minAvailable: got %v, want 1", pdb.Name, mn)
	}
}

// proxyContainers returns every container, init (sidecar) containers
// included, that runs `streamlb proxy`, named "Kind/name/container".
func (m *manifests) proxyContainers() map[string]corev1.Container {
	out := map[string]corev1.Container{}
	for _, w := range m.workloads() {
		for _, c := range slices.Concat(w.spec.InitContainers, w.spec.Containers) {
			if len(c.Args) > 0 && c.Args[0] == "proxy" {
				out[w.name+"/"+c.Name] = c
			}
		}
	}
	return out
}

// TestProxyContainers checks what every streamlb proxy container, central
// or sidecar, needs: GOMEMLIMIT from its memory limit, and readiness and
// liveness probes on /readyz and /healthz of its admin port.
func TestProxyContainers(t *testing.T) {
	t.Parallel()
	m := load(t)
	proxies := m.proxyContainers()
	for _, want := range []string{"Deployment/" + proxyName + "/streamlb", "Job/" + sidecarJobName + "/streamlb"} {
		if _, ok := proxies[want]; !ok {
			t.Fatalf("proxy containers %v: no %s", sortedKeys(proxies), want)
		}
	}
	specs := map[string]*corev1.PodSpec{}
	for _, w := range m.workloads() {
		specs[w.name] = w.spec
	}
	for _, name := range sortedKeys(proxies) {
		c := proxies[name]
		spec := specs[name[:strings.LastIndex(name, "/")]]
		t.Run(name, func(t *testing.T) {
			checkGoMemLimit(t, c)
			checkAdminProbes(t, c, proxyArgs(t, m, spec, c))
		})
	}
}

// checkGoMemLimit checks that GOMEMLIMIT is the container's memory limit in
// bytes.
func checkGoMemLimit(t *testing.T, c corev1.Container) {
	t.Helper()
	i := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "GOMEMLIMIT" })
	if i < 0 {
		t.Error("no GOMEMLIMIT env var")
		return
	}
	e := c.Env[i]
	if e.ValueFrom == nil || e.ValueFrom.ResourceFieldRef == nil {
		t.Errorf("GOMEMLIMIT: got %+v, want valueFrom.resourceFieldRef", e)
		return
	}
	ref := e.ValueFrom.ResourceFieldRef
	if ref.Resource != "limits.memory" {
		t.Errorf("GOMEMLIMIT resource: got %q, want limits.memory", ref.Resource)
	}
	if ref.ContainerName != "" && ref.ContainerName != c.Name {
		t.Errorf("GOMEMLIMIT containerName: got %q, want %q (its own container)", ref.ContainerName, c.Name)
	}
	// Go reads a bare number as bytes: any other divisor would make the
	// limit 2^20 or 10^6 times too small.
	if d := ref.Divisor; !d.IsZero() && d.Value() != 1 {
		t.Errorf("GOMEMLIMIT divisor: got %s, want 1 (bytes)", d.String())
	}
	if _, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok {
		t.Error("GOMEMLIMIT comes from limits.memory, but the container has no memory limit")
	}
}

// checkAdminProbes checks that readiness is /readyz and liveness /healthz,
// both on the container port named admin, which is --admin-listen's port
// (in args, see proxyArgs).
func checkAdminProbes(t *testing.T, c corev1.Container, args []string) {
	t.Helper()
	_, port, err := net.SplitHostPort(flagValue(t, args, "admin-listen"))
	if err != nil {
		t.Fatalf("--admin-listen: %v", err)
	}
	i := slices.IndexFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.Name == "admin" })
	if i < 0 {
		t.Fatal("no container port named admin")
	}
	if got := strconv.Itoa(int(c.Ports[i].ContainerPort)); got != port {
		t.Errorf("container port admin is %s, but --admin-listen's port is %s", got, port)
	}
	for _, p := range []struct {
		name, path string
		probe      *corev1.Probe
	}{
		{"readinessProbe", "/readyz", c.ReadinessProbe},
		{"livenessProbe", "/healthz", c.LivenessProbe},
	} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s: got %+v, want an HTTP GET of %s on the admin port", p.name, p.probe, p.path)
			continue
		}
		g := p.probe.HTTPGet
		if g.Path != p.path {
			t.Errorf("%s path: got %q, want %q", p.name, g.Path, p.path)
		}
		if g.Port.String() != "admin" && g.Port.String() != port {
			t.Errorf("%s port: got %s, want admin (%s)", p.name, g.Port.String(), port)
		}
		if g.Scheme != "" && g.Scheme != corev1.URISchemeHTTP {
			t.Errorf("%s scheme: got %s, want HTTP (the admin port is cleartext)", p.name, g.Scheme)
		}
	}
}

// secretFile returns the path at which container c sees key of Secret
// secret, through a whole-directory (no subPath) mount of a volume of spec,
// or "" if it does not.
func secretFile(spec *corev1.PodSpec, c corev1.Container, secret, key string) string {
	for _, vm := range c.VolumeMounts {
		i := slices.IndexFunc(spec.Volumes, func(v corev1.Volume) bool { return v.Name == vm.Name })
		if i < 0 || vm.SubPath != "" || vm.SubPathExpr != "" {
			continue
		}
		src := spec.Volumes[i].Secret
		if src == nil || src.SecretName != secret {
			continue
		}
		file := key
		if len(src.Items) > 0 {
			j := slices.IndexFunc(src.Items, func(kp corev1.KeyToPath) bool { return kp.Key == key })
			if j < 0 {
				continue
			}
			file = src.Items[j].Path
		}
		return filepath.Join(vm.MountPath, file)
	}
	return ""
}

// TestProxyTLS checks that the proxy's --tls-cert and --tls-key are the
// tls.crt and tls.key of the TLS Secret, mounted read-only as a directory
// (a subPath mount would never see a rotated certificate), and that the
// load Job verifies the proxy against that Secret's ca.crt.
func TestProxyTLS(t *testing.T) {
	t.Parallel()
	m := load(t)
	spec := &mustDeployment(t, m, proxyName).Spec.Template.Spec
	c := onlyContainer(t, "Deployment/"+proxyName, spec)
	args := proxyArgs(t, m, spec, c)
	for _, f := range []struct{ flag, key string }{{"tls-cert", "tls.crt"}, {"tls-key", "tls.key"}} {
		got := flagValue(t, args, f.flag)
		if want := secretFile(spec, c, tlsSecretName, f.key); got != want || want == "" {
			t.Errorf("--%s: got %q, want key %s of Secret %s through a volume mount without subPath (at %q)", f.flag, got, f.key, tlsSecretName, want)
		}
	}
	for _, vm := range c.VolumeMounts {
		if !vm.ReadOnly {
			t.Errorf("volume mount %s is not readOnly", vm.Name)
		}
	}

	j, ok := m.jobs[loadJobName]
	if !ok {
		t.Fatalf("no Job %q", loadJobName)
	}
	jspec := &j.Spec.Template.Spec
	lc := onlyContainer(t, "Job/"+loadJobName, jspec)
	if got := flagValue(t, lc.Args, "insecure"); got != "false" {
		t.Errorf("load Job --insecure: got %s, want false: the proxy serves TLS", got)
	}
	if got, want := flagValue(t, lc.Args, "cacert"), secretFile(jspec, lc, tlsSecretName, "ca.crt"); got != want || want == "" {
		t.Errorf("load Job --cacert: got %q, want key ca.crt of Secret %s through a volume mount (at %q)", got, tlsSecretName, want)
	}
	for _, v := range jspec.Volumes {
		if v.Secret != nil && v.Secret.SecretName == tlsSecretName &&
			(len(v.Secret.Items) == 0 || slices.ContainsFunc(v.Secret.Items, func(kp corev1.KeyToPath) bool { return kp.Key == "tls.key" })) {
			t.Errorf("load Job volume %s mounts the proxy's private key; project only ca.crt", v.Name)
		}
	}
}

// isSidecar reports whether init container c is a native sidecar.
func isSidecar(c corev1.Container) bool {
	return c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways
}

// TestSidecar checks the per-host example: streamlb is a native sidecar of
// the client's pod, listens on 127.0.0.1 only, balances the same headless
// Service as the central proxy, holds the client back until it is ready,
// and the client dials it on loopback.
func TestSidecar(t *testing.T) {
	t.Parallel()
	m := load(t)
	j, ok := m.jobs[sidecarJobName]
	if !ok {
		t.Fatalf("no Job %q", sidecarJobName)
	}
	spec := &j.Spec.Template.Spec
	if len(spec.InitContainers) != 1 {
		t.Fatalf("got %d init containers, want the streamlb sidecar only", len(spec.InitContainers))
	}
	sc := spec.InitContainers[0]
	if !isSidecar(sc) {
		t.Errorf("init container %s: restartPolicy %s, want Always (a native sidecar)", sc.Name, deref(sc.RestartPolicy))
	}
	if len(sc.Args) == 0 || sc.Args[0] != "proxy" {
		t.Fatalf("sidecar args: got %q, want the proxy subcommand first", sc.Args)
	}
	listen := flagValue(t, sc.Args, "listen")
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		t.Fatalf("sidecar --listen %q: %v", listen, err)
	}
	if host != "127.0.0.1" {
		t.Errorf("sidecar --listen %q: want host 127.0.0.1, so only its own pod can reach it", listen)
	}
	for _, f := range []string{"tls-cert", "tls-key"} {
		if len(flagValues(sc.Args, f)) > 0 {
			t.Errorf("sidecar sets --%s; loopback traffic needs no TLS and the example has no Secret for it", f)
		}
	}
	addr, ok := strings.CutPrefix(flagValue(t, sc.Args, "backend"), "dns:///")
	if !ok {
		t.Errorf("sidecar --backend %q: want the dns:/// scheme", flagValue(t, sc.Args, "backend"))
	} else {
		checkServiceAddr(t, "sidecar --backend", addr, mustService(t, m, backendName), "grpc")
	}
	if p := sc.StartupProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/readyz" || p.HTTPGet.Port.String() != "admin" {
		t.Errorf("sidecar startupProbe: got %+v, want /readyz on the admin port, so the client starts once a backend is ready", p)
	}

	c := onlyContainer(t, "Job/"+sidecarJobName, spec)
	if len(c.Args) == 0 || c.Args[0] != "loadtest" {
		t.Fatalf("args: got %q, want the loadtest subcommand first", c.Args)
	}
	if got := flagValue(t, c.Args, "target"); got != listen {
		t.Errorf("client --target: got %q, want the sidecar's --listen %q", got, listen)
	}
	if got := flagValues(c.Args, "insecure"); len(got) > 0 && got[0] != "true" {
		t.Errorf("client --insecure=%s: the sidecar serves cleartext h2c on loopback", got[0])
	}
}

// podMonitor is the part of the Prometheus operator's PodMonitor
// (monitoring.coreos.com/v1) the demo uses. k8s.io/api has no type for the
// CRD, so it is decoded into this struct, as strictly as the typed
// manifests: a field the struct lacks fails the test until it is added
// here, after checking it against the operator's API reference.
type podMonitor struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		Selector            metav1.LabelSelector `json:"selector"`
		PodMetricsEndpoints []struct {
			Port          string `json:"port"`
			Path          string `json:"path,omitempty"`
			Scheme        string `json:"scheme,omitempty"`
			Interval      string `json:"interval,omitempty"`
			ScrapeTimeout string `json:"scrapeTimeout,omitempty"`
		} `json:"podMetricsEndpoints"`
	} `json:"spec"`
}

// decodeStrict decodes one YAML document into v as decode does: duplicate
// keys, unknown fields and fields in the wrong case fail.
func decodeStrict(doc []byte, v any) error {
	js, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return fmt.Errorf("yaml: %w", err)
	}
	strictErrs, err := kjson.UnmarshalStrict(js, v)
	return errors.Join(append(strictErrs, err)...)
}

// TestPodMonitor checks the monitoring kustomization: its only resource is
// a PodMonitor whose selector matches the proxy's pods and which scrapes
// /metrics on a named port of the proxy container, the admin port.
func TestPodMonitor(t *testing.T) {
	t.Parallel()
	files := yamlFilesIn(t, monitoringDir)
	if diff := cmp.Diff([]string{"podmonitor.yaml"}, files); diff != "" {
		t.Fatalf("%s: YAML files (-want +got):\n%s", monitoringDir, diff)
	}
	k := readKustomization(t, filepath.Join(monitoringDir, kustomizeFile))
	if diff := cmp.Diff(files, slices.Sorted(slices.Values(k.Resources))); diff != "" {
		t.Errorf("%s resources (-want +got):\n%s", monitoringDir, diff)
	}
	if k.Namespace != demoNamespace {
		t.Errorf("%s namespace: got %q, want %q", monitoringDir, k.Namespace, demoNamespace)
	}

	data, err := os.ReadFile(filepath.Join(monitoringDir, files[0]))
	if err != nil {
		t.Fatal(err)
	}
	docs := splitDocuments(string(data))
	if len(docs) != 1 {
		t.Fatalf("%s: got %d documents, want 1", files[0], len(docs))
	}
	var pm podMonitor
	if err := decodeStrict([]byte(docs[0]), &pm); err != nil {
		t.Fatalf("%s: %v", files[0], err)
	}
	if pm.APIVersion != "monitoring.coreos.com/v1" || pm.Kind != "PodMonitor" {
		t.Errorf("got %s %s, want monitoring.coreos.com/v1 PodMonitor", pm.APIVersion, pm.Kind)
	}
	if pm.Metadata.Namespace != demoNamespace {
		t.Errorf("PodMonitor namespace: got %q, want %q", pm.Metadata.Namespace, demoNamespace)
	}

	m := load(t)
	d := mustDeployment(t, m, proxyName)
	if len(pm.Spec.Selector.MatchExpressions) > 0 || !selects(pm.Spec.Selector.MatchLabels, d.Spec.Template.Labels) {
		t.Errorf("PodMonitor selector %+v does not match the proxy's pod labels %v", pm.Spec.Selector, d.Spec.Template.Labels)
	}
	for _, w := range m.workloads() {
		if w.name != "Deployment/"+proxyName && selects(pm.Spec.Selector.MatchLabels, w.labels) {
			t.Errorf("PodMonitor selector %v also matches %s", pm.Spec.Selector.MatchLabels, w.name)
		}
	}
	c := onlyContainer(t, "Deployment/"+proxyName, &d.Spec.Template.Spec)
	if args := proxyArgs(t, m, &d.Spec.Template.Spec, c); slices.Contains(flagValues(args, "metrics"), "false") || slices.Contains(args, "--metrics=false") {
		t.Error("the proxy runs with --metrics=false; there is nothing to scrape")
	}
	if len(pm.Spec.PodMetricsEndpoints) == 0 {
		t.Fatal("PodMonitor has no podMetricsEndpoints")
	}
	for i, ep := range pm.Spec.PodMetricsEndpoints {
		if ep.Port != "admin" || !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.Name == ep.Port }) {
			t.Errorf("podMetricsEndpoints[%d].port: got %q, want admin, a container port of the proxy", i, ep.Port)
		}
		if ep.Path != "/metrics" {
			t.Errorf("podMetricsEndpoints[%d].path: got %q, want /metrics", i, ep.Path)
		}
		if ep.Scheme != "" && ep.Scheme != "http" {
			t.Errorf("podMetricsEndpoints[%d].scheme: got %q, want http (the admin port is cleartext)", i, ep.Scheme)
		}
		if ep.Interval != "" {
			if _, err := time.ParseDuration(ep.Interval); err != nil {
				t.Errorf("podMetricsEndpoints[%d].interval: %v", i, err)
			}
		}
	}
}

// TestLoadJob checks that the load test runs once, through the proxy's
// Service.
func TestLoadJob(t *testing.T) {
	t.Parallel()
	m := load(t)
	j, ok := m.jobs[loadJobName]
	if !ok {
		t.Fatalf("no Job %q", loadJobName)
	}
	if j.Spec.BackoffLimit == nil || *j.Spec.BackoffLimit != 0 {
		t.Errorf("backoffLimit: got %s, want 0", deref(j.Spec.BackoffLimit))
	}
	if j.Spec.TTLSecondsAfterFinished == nil {
		t.Error("ttlSecondsAfterFinished is not set")
	}
	if got := j.Spec.Template.Spec.RestartPolicy; got != corev1.RestartPolicyNever {
		t.Errorf("restartPolicy: got %q, want %q", got, corev1.RestartPolicyNever)
	}
	c := onlyContainer(t, "Job/"+loadJobName, &j.Spec.Template.Spec)
	if len(c.Args) == 0 || c.Args[0] != "loadtest" {
		t.Fatalf("args: got %q, want the loadtest subcommand first", c.Args)
	}
	checkServiceAddr(t, "--target", flagValue(t, c.Args, "target"), mustService(t, m, proxyName), "grpc")
	if got := flagValue(t, c.Args, "connections"); got != "1" {
		t.Errorf("--connections: got %s, want 1: the demo shows one connection's calls spread over every pod", got)
	}
}

// TestServicesMatchContainers checks that each Service selects the pods of
// exactly one workload and that each Service port targets a container port
// of the same name.
func TestServicesMatchContainers(t *testing.T) {
	t.Parallel()
	m := load(t)
	for _, name := range sortedKeys(m.services) {
		svc := m.services[name]
		var selected []workload
		for _, w := range m.workloads() {
			if selects(svc.Spec.Selector, w.labels) {
				selected = append(selected, w)
			}
		}
		if len(selected) != 1 {
			t.Errorf("Service %s selector %v matches %d workloads, want 1", name, svc.Spec.Selector, len(selected))
			continue
		}
		w := selected[0]
		if len(svc.Spec.Ports) == 0 {
			t.Errorf("Service %s has no ports", name)
		}
		for _, sp := range svc.Spec.Ports {
			var found bool
			for _, c := range w.spec.Containers {
				for _, cp := range c.Ports {
					if cp.Name != sp.Name {
						continue
					}
					found = true
					if tp := sp.TargetPort; tp.String() != cp.Name && tp.IntValue() != int(cp.ContainerPort) {
						t.Errorf("Service %s port %q targets %s, want container %s port %q (%d)", name, sp.Name, tp.String(), c.Name, cp.Name, cp.ContainerPort)
					}
					if sp.Port != cp.ContainerPort {
						t.Errorf("Service %s port %q is %d but the container port is %d; clients and pods should agree on the number", name, sp.Name, sp.Port, cp.ContainerPort)
					}
				}
			}
			if !found {
				t.Errorf("Service %s port %q: %s has no container port of that name", name, sp.Name, w.name)
			}
		}
	}
}

// TestContainersHardened checks every container, of Deployments and Jobs
// alike, for what the restricted Pod Security Standard and a production
// cluster expect: non-root, read-only root, no privilege escalation, no
// capabilities, RuntimeDefault seccomp, requests and limits, and probes for
// anything that serves traffic.
func TestContainersHardened(t *testing.T) {
	t.Parallel()
	m := load(t)
	for _, w := range m.workloads() {
		if len(w.spec.EphemeralContainers) > 0 {
			t.Errorf("%s: has ephemeral containers, which this test does not check", w.name)
		}
		if w.spec.AutomountServiceAccountToken == nil || *w.spec.AutomountServiceAccountToken {
			t.Errorf("%s: automountServiceAccountToken is not false; nothing in the demo calls the Kubernetes API", w.name)
		}
		pod := w.spec.SecurityContext
		if pod == nil {
			pod = &corev1.PodSecurityContext{}
		}
		// Init containers are only allowed as native sidecars, which run
		// for the pod's whole life and so need what any server needs.
		for _, c := range w.spec.InitContainers {
			t.Run(w.name+"/init/"+c.Name, func(t *testing.T) {
				if !isSidecar(c) {
					t.Fatal("an init container that is not a native sidecar (restartPolicy: Always), which this test does not check")
				}
				checkContainer(t, c, pod, true)
			})
		}
		for _, c := range w.spec.Containers {
			t.Run(w.name+"/"+c.Name, func(t *testing.T) {
				checkContainer(t, c, pod, w.probed)
			})
		}
	}
}

func checkContainer(t *testing.T, c corev1.Container, pod *corev1.PodSecurityContext, probed bool) {
	// The proxy runs the production image (-tags proxyonly), which has no
	// testserver or loadtest command; those run the dev image.
	want := imageName
	if len(c.Args) > 0 && c.Args[0] != "proxy" {
		want = devImageName
	}
	if c.Image != want {
		t.Errorf("image: got %q, want %q (command %q), which kustomization.yaml's images entry rewrites", c.Image, want, c.Args)
	}

	sc := c.SecurityContext
	if sc == nil {
		t.Fatal("no securityContext")
	}
	// A container's setting overrides the pod's.
	runAsNonRoot, runAsUser := pod.RunAsNonRoot, pod.RunAsUser
	if sc.RunAsNonRoot != nil {
		runAsNonRoot = sc.RunAsNonRoot
	}
	if sc.RunAsUser != nil {
		runAsUser = sc.RunAsUser
	}
	if runAsNonRoot == nil || !*runAsNonRoot {
		t.Error("runAsNonRoot is not true")
	}
	if runAsUser == nil || *runAsUser != nonRootUID {
		t.Errorf("runAsUser: got %s, want %d", deref(runAsUser), nonRootUID)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("readOnlyRootFilesystem is not true")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("allowPrivilegeEscalation is not false")
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("privileged")
	}
	if caps := sc.Capabilities; caps == nil || !slices.Contains(caps.Drop, "ALL") || len(caps.Add) > 0 {
		t.Errorf("capabilities: got %+v, want drop [ALL] and nothing added", caps)
	}
	seccomp := pod.SeccompProfile
	if sc.SeccompProfile != nil {
		seccomp = sc.SeccompProfile
	}
	if seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("seccompProfile: got %+v, want RuntimeDefault", seccomp)
	}

	for _, res := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		req, okReq := c.Resources.Requests[res]
		lim, okLim := c.Resources.Limits[res]
		if !okReq || !okLim {
			t.Errorf("resources %s: request set %v, limit set %v, want both", res, okReq, okLim)
			continue
		}
		if req.Cmp(lim) > 0 {
			t.Errorf("resources %s: request %s is above limit %s", res, req.String(), lim.String())
		}
	}

	if !probed {
		return
	}
	for name, p := range map[string]*corev1.Probe{"readinessProbe": c.ReadinessProbe, "livenessProbe": c.LivenessProbe} {
		if p == nil {
			t.Errorf("no %s", name)
			continue
		}
		checkProbePort(t, name, p, c.Ports)
	}
}

// checkProbePort checks that probe p targets one of the container's ports.
func checkProbePort(t *testing.T, name string, p *corev1.Probe, ports []corev1.ContainerPort) {
	t.Helper()
	has := func(match func(corev1.ContainerPort) bool) bool { return slices.ContainsFunc(ports, match) }
	switch {
	case p.GRPC != nil:
		if !has(func(cp corev1.ContainerPort) bool { return cp.ContainerPort == p.GRPC.Port }) {
			t.Errorf("%s: gRPC port %d is not a container port", name, p.GRPC.Port)
		}
	case p.HTTPGet != nil:
		port := p.HTTPGet.Port
		if !has(func(cp corev1.ContainerPort) bool {
			return cp.Name == port.String() || int(cp.ContainerPort) == port.IntValue()
		}) {
			t.Errorf("%s: HTTP port %s is not a container port", name, port.String())
		}
	case p.TCPSocket != nil, p.Exec != nil:
		t.Errorf("%s: want a gRPC or HTTP probe, which checks the server answers, not only that it listens", name)
	default:
		t.Errorf("%s: no handler", name)
	}
}

// kustomization is the part of kustomization.yaml the demo uses. It is
// decoded strictly too: a field kustomize knows but this struct does not
// fails the test until it is added here.
type kustomization struct {
	APIVersion string           `json:"apiVersion"`
	Kind       string           `json:"kind"`
	Namespace  string           `json:"namespace"`
	Resources  []string         `json:"resources"`
	Images     []kustomizeImage `json:"images"`
}

// kustomizeImage is one entry of a kustomization's images list.
type kustomizeImage struct {
	Name    string `json:"name"`
	NewName string `json:"newName,omitempty"`
	NewTag  string `json:"newTag,omitempty"`
	Digest  string `json:"digest,omitempty"`
}

// readKustomization decodes the kustomization file at path strictly.
func readKustomization(t *testing.T, path string) kustomization {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization
	if err := decodeStrict(data, &k); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if k.Kind != "Kustomization" || !strings.HasPrefix(k.APIVersion, "kustomize.config.k8s.io/") {
		t.Errorf("%s: got kind %q apiVersion %q, want a kustomize.config.k8s.io Kustomization", path, k.Kind, k.APIVersion)
	}
	return k
}

func TestKustomization(t *testing.T) {
	t.Parallel()
	k := readKustomization(t, kustomizeFile)
	if k.Kind != "Kustomization" || !strings.HasPrefix(k.APIVersion, "kustomize.config.k8s.io/") {
		t.Errorf("got kind %q apiVersion %q, want a kustomize.config.k8s.io Kustomization", k.Kind, k.APIVersion)
	}
	if k.Namespace != demoNamespace {
		t.Errorf("namespace: got %q, want %q", k.Namespace, demoNamespace)
	}
	got := slices.Sorted(slices.Values(k.Resources))
	if diff := cmp.Diff(yamlFiles(t), got); diff != "" {
		t.Errorf("resources, want every YAML file in the directory once (-want +got):\n%s", diff)
	}
	for _, name := range []string{imageName, devImageName} {
		if !slices.ContainsFunc(k.Images, func(i kustomizeImage) bool { return i.Name == name }) {
			t.Errorf("images: no entry for %q, an image the containers name", name)
		}
	}
}

// TestDockerfile checks the image the manifests run: a static binary on
// distroless, running as the user the manifests pin.
func TestDockerfile(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile(dockerfilePath)
	if err != nil {
		t.Fatal(err)
	}
	var final []string // instructions of the last stage
	var build string   // the RUN instruction that runs go build
	for _, ins := range dockerInstructions(string(data)) {
		if strings.HasPrefix(ins, "FROM ") {
			final = nil
		}
		final = append(final, ins)
		if strings.HasPrefix(ins, "RUN ") && strings.Contains(ins, "go build") {
			build = ins
		}
	}
	if len(final) == 0 {
		t.Fatal("no FROM instruction")
	}
	if got, want := final[0], "FROM gcr.io/distroless/static-debian12:nonroot"; got != want {
		t.Errorf("final stage: got %q, want %q", got, want)
	}
	if !slices.Contains(final, fmt.Sprintf("USER %d:%d", nonRootUID, nonRootUID)) {
		t.Errorf("final stage %q: no USER %d:%d", final, nonRootUID, nonRootUID)
	}
	if !slices.Contains(final, `ENTRYPOINT ["/streamlb"]`) {
		t.Errorf("final stage %q: want ENTRYPOINT [\"/streamlb\"]", final)
	}
	if !slices.Contains(final, "EXPOSE 8080 9901") {
		t.Errorf("final stage %q: want EXPOSE 8080 9901", final)
	}
	if build == "" {
		t.Fatal("no RUN instruction runs go build")
	}
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "-o /out/streamlb"} {
		if !strings.Contains(build, want) {
			t.Errorf("build %q: want %q (a static binary for distroless/static)", build, want)
		}
	}
	// The last go build is the final stage's: the production binary.
	if !strings.Contains(build, "-tags proxyonly") {
		t.Errorf("build %q: the final image's binary is not the proxy-only build (-tags proxyonly)", build)
	}
	if !slices.Contains(final, "COPY --from=build-prod /out/streamlb /streamlb") {
		t.Errorf("final stage %q: want the binary of the build-prod stage", final)
	}

	ignore, err := os.ReadFile(filepath.Join(filepath.Dir(dockerfilePath), ".dockerignore"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(ignore), "\n")
	for _, want := range []string{".git", "deploy"} {
		if !slices.Contains(lines, want) {
			t.Errorf(".dockerignore: no %q line", want)
		}
	}
}

// dockerInstructions returns the instructions of a Dockerfile with
// continuation lines joined, comments dropped and runs of spaces collapsed.
func dockerInstructions(dockerfile string) []string {
	var out []string
	var cur strings.Builder
	for _, line := range strings.Split(dockerfile, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		more := strings.HasSuffix(line, "\\")
		cur.WriteString(strings.TrimSuffix(line, "\\"))
		cur.WriteString(" ")
		if !more {
			out = append(out, strings.Join(strings.Fields(cur.String()), " "))
			cur.Reset()
		}
	}
	return out
}

// TestProxyConfigMap checks that the central proxy takes its settings from
// the ConfigMap's streamlb.yaml, mounted as a directory so that the
// kubelet's updates reach it (the proxy reloads the file when it changes),
// and that the file is a valid configuration: the proxy's own parser
// accepts it, and the server it describes builds (the TLS files, which
// exist only in the pod, left out).
func TestProxyConfigMap(t *testing.T) {
	t.Parallel()
	m := load(t)
	d := mustDeployment(t, m, proxyName)
	spec := &d.Spec.Template.Spec
	c := onlyContainer(t, "Deployment/"+proxyName, spec)
	f, cm := configFile(t, m, spec, c)
	if f == nil {
		t.Fatalf("proxy args %q: no --config", c.Args)
	}
	if cm.Name != configMapName {
		t.Errorf("--config comes from ConfigMap %s, want %s", cm.Name, configMapName)
	}
	// --config cannot be mixed with the other proxy flags (a usage error);
	// only the log flags go beside it.
	for i := 1; i < len(c.Args); i++ {
		name, _, _ := strings.Cut(strings.TrimPrefix(c.Args[i], "--"), "=")
		switch {
		case !strings.HasPrefix(c.Args[i], "--"):
		case name == "config", name == "log-level", name == "log-format":
		default:
			t.Errorf("proxy arg %s beside --config: the proxy refuses the mix", c.Args[i])
		}
	}
	for _, vm := range c.VolumeMounts {
		if vm.MountPath == filepath.Dir(flagValue(t, c.Args, "config")) && !vm.ReadOnly {
			t.Errorf("volume mount %s of the configuration is not readOnly", vm.Name)
		}
	}
	cfg := f.ServerConfig()
	cfg.TLS = nil // its files are in the Secret, which is not here
	cfg.Logger = slog.New(slog.DiscardHandler)
	if _, err := cluster.NewServer(cfg); err != nil {
		t.Errorf("the ConfigMap's configuration does not build: %v", err)
	}
	if len(f.Routes) == 0 || len(f.Clusters) == 0 {
		t.Errorf("the configuration has %d clusters and %d routes, want some of each", len(f.Clusters), len(f.Routes))
	}
	if f.TLS == nil || f.TLS.Cert != secretFile(spec, c, tlsSecretName, "tls.crt") {
		t.Errorf("the configuration's tls.cert is not tls.crt of the Secret %s", tlsSecretName)
	}
	// Every key of the ConfigMap is meant for the proxy: a second file
	// would be a file nobody reads.
	if len(cm.Data) != 1 || len(cm.BinaryData) != 0 {
		t.Errorf("ConfigMap %s has keys %v, want only the configuration file", cm.Name, sortedKeys(cm.Data))
	}
}
