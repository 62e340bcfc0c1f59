package resolver

import (
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

type targetCase struct {
	name    string
	in      string
	want    Target
	wantErr string // substring of the error; "" means success
}

var targetCases = []targetCase{
	// Static targets.
	{name: "ipv4", in: "10.0.0.1:80", want: Target{Host: "10.0.0.1", Port: 80}},
	{name: "ipv6", in: "[::1]:443", want: Target{Host: "::1", Port: 443}},
	{name: "ipv6 canonicalised", in: "[2001:DB8:0:0::0001]:8080", want: Target{Host: "2001:db8::1", Port: 8080}},
	{name: "ipv6 zone", in: "[fe80::1%eth0]:80", want: Target{Host: "fe80::1%eth0", Port: 80}},
	{name: "ipv4-mapped ipv6", in: "[::ffff:10.0.0.1]:80", want: Target{Host: "::ffff:10.0.0.1", Port: 80}},
	{name: "hostname", in: "backend-1.example.com:50051", want: Target{Host: "backend-1.example.com", Port: 50051}},
	{name: "hostname lower-cased", in: "Backend.Example.COM:1", want: Target{Host: "backend.example.com", Port: 1}},
	{name: "hostname trailing dot", in: "example.com.:65535", want: Target{Host: "example.com.", Port: 65535}},
	{name: "localhost", in: "localhost:9000", want: Target{Host: "localhost", Port: 9000}},
	{name: "port leading zeros", in: "10.0.0.1:0080", want: Target{Host: "10.0.0.1", Port: 80}},
	{name: "weight", in: "10.0.0.1:80;weight=3", want: Target{Host: "10.0.0.1", Port: 80, Weight: 3}},
	{name: "weight max", in: "[::1]:80;weight=10000", want: Target{Host: "::1", Port: 80, Weight: 10000}},
	{name: "weight min", in: "h:80;weight=1", want: Target{Host: "h", Port: 80, Weight: 1}},

	// DNS targets.
	{name: "dns", in: "dns:///backend.svc:50051", want: Target{Scheme: "dns", Host: "backend.svc", Port: 50051}},
	{name: "dns upper-case scheme", in: "DNS:///backend.svc:50051", want: Target{Scheme: "dns", Host: "backend.svc", Port: 50051}},
	{name: "dns authority", in: "dns://8.8.8.8:53/backend.svc:50051", want: Target{Scheme: "dns", Authority: "8.8.8.8:53", Host: "backend.svc", Port: 50051}},
	{name: "dns ipv6 authority", in: "dns://[2001:4860:4860::8888]:53/b:1", want: Target{Scheme: "dns", Authority: "[2001:4860:4860::8888]:53", Host: "b", Port: 1}},
	{name: "dns hostname authority", in: "dns://ns1.example.com:5353/b:1", want: Target{Scheme: "dns", Authority: "ns1.example.com:5353", Host: "b", Port: 1}},
	{name: "dns ip literal", in: "dns:///10.0.0.1:80", want: Target{Scheme: "dns", Host: "10.0.0.1", Port: 80}},
	{name: "srv", in: "dns+srv:///_grpc._tcp.backend.svc", want: Target{Scheme: "dns+srv", Host: "_grpc._tcp.backend.svc"}},
	{name: "srv authority", in: "dns+srv://127.0.0.1:53/_grpc._tcp.b", want: Target{Scheme: "dns+srv", Authority: "127.0.0.1:53", Host: "_grpc._tcp.b"}},

	// etcd targets.
	{name: "etcd", in: "etcd://127.0.0.1:2379/svc", want: Target{Scheme: "etcd", Authority: "127.0.0.1:2379", Host: "svc"}},
	{name: "etcd endpoints", in: "ETCD://10.0.0.1:2379,Etcd-1.Example:02379,[::1]:2379/kitex/registry-etcd/Echo", want: Target{Scheme: "etcd", Authority: "10.0.0.1:2379,etcd-1.example:2379,[::1]:2379", Host: "kitex/registry-etcd/Echo"}},
	{name: "etcd trailing slash", in: "etcd://h:1/svc//", want: Target{Scheme: "etcd", Authority: "h:1", Host: "svc"}},
	{name: "etcd absolute prefix", in: "etcd://h:1//microservices/helloworld", want: Target{Scheme: "etcd", Authority: "h:1", Host: "/microservices/helloworld"}},
	{name: "etcd format", in: "etcd://h:1/svc?format=Kitex", want: Target{Scheme: "etcd", Authority: "h:1", Host: "svc", Format: "kitex"}},
	{name: "etcd format auto", in: "etcd://h:1/svc?format=auto", want: Target{Scheme: "etcd", Authority: "h:1", Host: "svc"}},
	{name: "etcd semicolon in prefix", in: "etcd://h:1/a;b", want: Target{Scheme: "etcd", Authority: "h:1", Host: "a;b"}},

	// ZooKeeper targets.
	{name: "zk", in: "zk://127.0.0.1:2181/kitex/echo", want: Target{Scheme: "zk", Authority: "127.0.0.1:2181", Host: "/kitex/echo"}},
	{name: "zk servers", in: "ZK://a:2181,B:02181/dubbo/com.foo.Greeter/providers/", want: Target{Scheme: "zk", Authority: "a:2181,b:2181", Host: "/dubbo/com.foo.Greeter/providers"}},
	{name: "zk double slash", in: "zk://h:1//microservices/hello", want: Target{Scheme: "zk", Authority: "h:1", Host: "/microservices/hello"}},
	{name: "zk format", in: "zk://h:1/svc?format=Dubbo", want: Target{Scheme: "zk", Authority: "h:1", Host: "/svc", Format: "dubbo"}},

	// Bad targets.
	{name: "empty", in: "", wantErr: "empty target"},
	{name: "white space", in: " 10.0.0.1:80", wantErr: "white space"},
	{name: "missing port", in: "10.0.0.1", wantErr: `resolver: target "10.0.0.1": missing port`},
	{name: "empty port", in: "10.0.0.1:", wantErr: "missing port"},
	{name: "missing host", in: ":80", wantErr: "missing host"},
	{name: "port zero", in: "10.0.0.1:0", wantErr: `invalid port "0": must be 1..65535`},
	{name: "port too big", in: "10.0.0.1:65536", wantErr: `invalid port "65536": must be 1..65535`},
	{name: "port not a number", in: "10.0.0.1:http", wantErr: "not a decimal number"},
	{name: "port signed", in: "10.0.0.1:+80", wantErr: "not a decimal number"},
	{name: "bare ipv6", in: "::1:80", wantErr: "enclose an IPv6 address in brackets"},
	{name: "ipv6 no port", in: "[::1]", wantErr: "missing port"},
	{name: "ipv6 no close", in: "[::1:80", wantErr: "missing ']'"},
	{name: "ipv6 junk after bracket", in: "[::1]x80", wantErr: "after ']'"},
	{name: "ipv4 in brackets", in: "[10.0.0.1]:80", wantErr: "brackets are only for IPv6"},
	{name: "bad ipv6", in: "[::g]:80", wantErr: "invalid IPv6 address"},
	{name: "bad ipv6 zone", in: "[fe80::1%a/b]:80", wantErr: "invalid IPv6 zone"},
	// An unspecified address is no backend: a dial to it reaches this
	// host (Linux), the proxy itself included. DNS and registry answers
	// of one are skipped with a warning instead (usableAddrs,
	// decodeHostPort).
	{name: "unspecified ipv4", in: "0.0.0.0:8080", wantErr: "unspecified IP 0.0.0.0 is not a backend address"},
	{name: "unspecified ipv6", in: "[::]:8080", wantErr: "unspecified IP :: is not a backend address"},
	{name: "unspecified mapped", in: "[::ffff:0.0.0.0]:8080", wantErr: "unspecified IP"},
	{name: "unspecified weighted", in: "0.0.0.0:8080;weight=2", wantErr: "unspecified IP"},
	{name: "dns unspecified literal", in: "dns:///0.0.0.0:8080", wantErr: "unspecified IP"},
	{name: "multicast", in: "224.0.0.1:8080", wantErr: "multicast IP 224.0.0.1 is not a backend address"},
	{name: "broadcast", in: "255.255.255.255:8080", wantErr: "broadcast IP"},
	{name: "bad ipv4", in: "10.0.0.256:80", wantErr: "neither an IP address nor a host name"},
	{name: "ipv4 leading zero", in: "010.0.0.1:80", wantErr: "neither an IP address nor a host name"},
	{name: "bad hostname char", in: "back_end:80", wantErr: "not allowed"},
	{name: "hostname empty label", in: "a..b:80", wantErr: "label"},
	{name: "hostname hyphen", in: "-a.b:80", wantErr: "starts or ends with '-'"},
	{name: "hostname label too long", in: strings.Repeat("a", 64) + ":80", wantErr: "1..63"},
	{name: "hostname too long", in: strings.Repeat("a.", 127) + "ab:80", wantErr: "1..253"},
	{name: "weight zero", in: "h:80;weight=0", wantErr: `invalid weight "0": must be 1..10000`},
	{name: "weight too big", in: "h:80;weight=10001", wantErr: "must be 1..10000"},
	{name: "weight overflow", in: "h:80;weight=99999999999", wantErr: "must be 1..10000"},
	{name: "weight not a number", in: "h:80;weight=x", wantErr: "not a decimal number"},
	{name: "weight empty", in: "h:80;weight=", wantErr: "not a decimal number"},
	{name: "weight twice", in: "h:80;weight=1;weight=2", wantErr: "more than once"},
	{name: "unknown parameter", in: "h:80;prio=1", wantErr: `unknown parameter "prio"`},
	{name: "trailing semicolon", in: "h:80;", wantErr: "want key=value"},
	{name: "unknown scheme", in: "unix:///tmp/sock", wantErr: `unknown scheme "unix"`},
	{name: "dns missing slash", in: "dns://backend:80", wantErr: "missing '/'"},
	{name: "dns missing name", in: "dns:///", wantErr: "missing name"},
	{name: "dns missing port", in: "dns:///backend", wantErr: "missing port"},
	{name: "dns bad authority", in: "dns://8.8.8.8/backend:80", wantErr: "dns server: missing port"},
	{name: "dns path", in: "dns:///a/b:80", wantErr: "not allowed"},
	{name: "dns weight", in: "dns:///backend:80;weight=2", wantErr: "only supported on static"},
	{name: "srv port", in: "dns+srv:///_grpc._tcp.b:80", wantErr: "must not have a port"},
	{name: "etcd no prefix", in: "etcd://h:1/", wantErr: "missing key prefix"},
	{name: "etcd only slashes", in: "etcd://h:1///", wantErr: "missing key prefix"},
	{name: "etcd no slash", in: "etcd://h:1", wantErr: "missing '/PREFIX'"},
	{name: "etcd no endpoint", in: "etcd:///svc", wantErr: "missing etcd endpoint"},
	{name: "etcd bad endpoint", in: "etcd://h:1,h/svc", wantErr: `etcd endpoint "h": missing port`},
	{name: "etcd empty endpoint", in: "etcd://h:1,/svc", wantErr: `etcd endpoint "": missing port`},
	{name: "etcd unknown format", in: "etcd://h:1/svc?format=consul", wantErr: `unknown format "consul"`},
	{name: "etcd unknown query", in: "etcd://h:1/svc?watch=1", wantErr: "only format=F"},
	{name: "etcd space in prefix", in: "etcd://h:1/a b", wantErr: "white space"},
	{name: "zk no path", in: "zk://h:1/", wantErr: "missing node path"},
	{name: "zk no slash", in: "zk://h:1", wantErr: "missing '/PATH'"},
	{name: "zk no endpoint", in: "zk:///svc", wantErr: "missing zk endpoint"},
	{name: "zk empty segment", in: "zk://h:1/a//b", wantErr: "empty path segment"},
	{name: "zk etcd-only format", in: "zk://h:1/svc?format=go-zero", wantErr: `unknown format "go-zero"`},
}

func TestParseTarget(t *testing.T) {
	t.Parallel()
	for _, tc := range targetCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := ParseTarget(tc.in)
			if tc.wantErr != "" {
				if err == nil {
					t.Fatalf("ParseTarget(%q) = %+v, want error containing %q", tc.in, got, tc.wantErr)
				}
				if !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseTarget(%q) error = %q, want it to contain %q", tc.in, err, tc.wantErr)
				}
				if !strings.HasPrefix(err.Error(), "resolver: target ") {
					t.Errorf("ParseTarget(%q) error = %q, want prefix %q", tc.in, err, "resolver: target ")
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseTarget(%q) error = %v, want nil", tc.in, err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("ParseTarget(%q) mismatch (-want +got):\n%s", tc.in, diff)
			}
		})
	}
}

func TestParseTargetWrapsUnderlyingError(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   string
	}{
		{name: "port out of range", in: "h:99999"},
		{name: "weight overflow", in: "h:80;weight=99999999999"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := ParseTarget(tc.in)
			var numErr *strconv.NumError
			if !errors.As(err, &numErr) {
				t.Errorf("ParseTarget(%q) error = %v, want it to wrap a *strconv.NumError", tc.in, err)
			}
		})
	}
}

func TestTargetString(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   string
		want string
	}{
		{name: "ipv4", in: "10.0.0.1:80", want: "10.0.0.1:80"},
		{name: "ipv6", in: "[2001:DB8::1]:80", want: "[2001:db8::1]:80"},
		{name: "weight", in: "Host:080;weight=07", want: "host:80;weight=7"},
		{name: "dns", in: "dns:///b:1", want: "dns:///b:1"},
		{name: "dns authority", in: "dns://[::1]:53/b:1", want: "dns://[::1]:53/b:1"},
		{name: "srv", in: "DNS+SRV:///_grpc._tcp.B", want: "dns+srv:///_grpc._tcp.b"},
		{name: "etcd", in: "ETCD://H:01,[::1]:2/Svc/?format=GO-ZERO", want: "etcd://h:1,[::1]:2/Svc?format=go-zero"},
		{name: "zk", in: "ZK://H:01//Svc/?format=KITEX", want: "zk://h:1/Svc?format=kitex"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tg, err := ParseTarget(tc.in)
			if err != nil {
				t.Fatalf("ParseTarget(%q) error = %v", tc.in, err)
			}
			if got := tg.String(); got != tc.want {
				t.Errorf("ParseTarget(%q).String() = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

// FuzzParseTarget checks that ParseTarget never panics, that what it accepts
// is well formed, and that every accepted target round-trips through String.
func FuzzParseTarget(f *testing.F) {
	for _, tc := range targetCases {
		f.Add(tc.in)
	}
	// Forms New and NewBuilder see.
	for _, s := range []string{
		"dns://127.0.0.1:5353/web.default.svc.cluster.local:50051",
		"dns+srv://[::1]:53/_grpc._tcp.web.default.svc.cluster.local",
		"dns:///web.default.svc.cluster.local.:443",
		"dns:///[fd00::1]:80",
		"dns://localhost:53/localhost:1",
		"etcd://127.0.0.1:2379,127.0.0.2:2379/kitex/registry-etcd/echo?format=kitex",
		"etcd://[::1]:2379//dubbo/com.foo.Greeter/providers",
		"etcd://localhost:2379/user.rpc?format=auto",
		"zk://127.0.0.1:2181//dubbo/com.foo.Greeter/providers?format=dubbo",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tg, err := ParseTarget(s)
		if err != nil {
			if tg != (Target{}) {
				t.Fatalf("ParseTarget(%q) returned %+v with error %v, want zero Target", s, tg, err)
			}
			if !strings.HasPrefix(err.Error(), "resolver: ") {
				t.Fatalf("ParseTarget(%q) error %q lacks package prefix", s, err)
			}
			return
		}
		if tg.Host == "" {
			t.Fatalf("ParseTarget(%q) = %+v with empty Host", s, tg)
		}
		if tg.Scheme != SchemeDNSSRV && tg.Scheme != SchemeEtcd && tg.Scheme != SchemeZK && tg.Port == 0 {
			t.Fatalf("ParseTarget(%q) = %+v with port 0", s, tg)
		}
		if tg.Weight != 0 && (!tg.IsStatic() || tg.Weight < MinWeight || tg.Weight > MaxWeight) {
			t.Fatalf("ParseTarget(%q) = %+v with bad weight", s, tg)
		}
		str := tg.String()
		again, err := ParseTarget(str)
		if err != nil {
			t.Fatalf("ParseTarget(%q).String() = %q does not reparse: %v", s, str, err)
		}
		if again != tg {
			t.Fatalf("round trip of %q via %q: got %+v, want %+v", s, str, again, tg)
		}
		if again.String() != str {
			t.Fatalf("String not canonical: %q then %q", str, again.String())
		}
		// Every DNS and etcd target ParseTarget accepts can be followed.
		if tg.Scheme == SchemeZK {
			if _, err := NewZK(tg, ZKOptions{}); err != nil {
				t.Fatalf("NewZK(ParseTarget(%q)) error = %v", s, err)
			}
			return
		}
		if tg.Scheme == SchemeEtcd {
			if _, err := NewEtcd(tg, EtcdOptions{}); err != nil {
				t.Fatalf("NewEtcd(ParseTarget(%q)) error = %v", s, err)
			}
			return
		}
		if !tg.IsStatic() {
			if _, err := NewDNS(tg, DNSOptions{}); err != nil {
				t.Fatalf("NewDNS(ParseTarget(%q)) error = %v", s, err)
			}
		}
	})
}
