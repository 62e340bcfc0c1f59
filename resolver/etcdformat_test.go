package resolver

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// Values as each framework writes them (see EtcdFormats).
const (
	kitexValue   = `{"network":"tcp","address":"10.0.0.1:8888","weight":25,"tags":{"cluster":"a","idc":"hz"}}`
	kratosValue  = `{"id":"b5a6c1","name":"helloworld","version":"v1.0.0","metadata":{"app":"x"},"endpoints":["http://10.0.0.2:8000?isSecure=false","grpc://10.0.0.2:9000?isSecure=false"]}`
	goMicroValue = `{"name":"greeter","version":"latest","metadata":null,"endpoints":[{"name":"Greeter.Hello","request":{"name":"Request","type":"Request"},"response":{"name":"Response","type":"Response"},"metadata":{}}],"nodes":[{"id":"greeter-7b3e","address":"10.0.0.3:5000","metadata":{"protocol":"grpc","registry":"etcd","server":"grpc","transport":"grpc"}}]}`
	namingValue  = `{"Op":0,"Addr":"10.0.0.4:50051","Metadata":{"zone":"b"}}`
	dubboKey     = "/dubbo/com.foo.Greeter/providers/tri%3A%2F%2F10.0.0.5%3A20000%2Fcom.foo.Greeter%3Fanyhost%3Dtrue%26application%3Dgreeter%26methods%3DSayHello%2CSayHelloStream%26side%3Dprovider"
)

func TestDecodeEtcdValue(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		key, value string
		format     string // the override; "" detects
		want       []string
		wantFormat string
		wantErr    string
	}{
		{name: "kitex", key: "kitex/registry-etcd/echo/10.0.0.1:8888", value: kitexValue, want: []string{"10.0.0.1:8888;weight=25"}, wantFormat: EtcdFormatKitex},
		{name: "kitex weight 0 is kitex default", key: "k/a", value: `{"network":"tcp","address":"10.0.0.1:1","weight":0,"tags":null}`, want: []string{"10.0.0.1:1;weight=10"}, wantFormat: EtcdFormatKitex},
		{name: "kitex weight capped", key: "k/a", value: `{"network":"tcp","address":"10.0.0.1:1","weight":99999}`, want: []string{"10.0.0.1:1;weight=10000"}, wantFormat: EtcdFormatKitex},
		{name: "kratos grpc endpoint", key: "/microservices/helloworld/b5a6c1", value: kratosValue, want: []string{"10.0.0.2:9000"}, wantFormat: EtcdFormatKratos},
		{name: "go-micro nodes", key: "/micro/registry/greeter/greeter-7b3e", value: goMicroValue, want: []string{"10.0.0.3:5000"}, wantFormat: EtcdFormatGoMicro},
		{name: "etcd naming", key: "svc/grpc/10.0.0.4:50051", value: namingValue, want: []string{"10.0.0.4:50051"}, wantFormat: EtcdFormatNaming},
		{name: "go-zero", key: "user.rpc/7587869768203541778", value: "10.0.0.6:8080", want: []string{"10.0.0.6:8080"}, wantFormat: EtcdFormatGoZero},
		{name: "go-zero host name", key: "user.rpc/1", value: "user-0.user:8080\n", want: []string{"user-0.user:8080"}, wantFormat: EtcdFormatGoZero},
		{name: "dubbo", key: dubboKey, value: "", want: []string{"10.0.0.5:20000"}, wantFormat: EtcdFormatDubbo},
		{name: "ipv6", key: "x/1", value: "[2001:db8::1]:80", want: []string{"[2001:db8::1]:80"}, wantFormat: EtcdFormatGoZero},
		{name: "override", key: "x/1", value: kitexValue, format: EtcdFormatKitex, want: []string{"10.0.0.1:8888;weight=25"}, wantFormat: EtcdFormatKitex},

		{name: "override mismatch", key: "x/1", value: "10.0.0.1:80", format: EtcdFormatKitex, wantFormat: EtcdFormatKitex, wantErr: "kitex value"},
		{name: "garbage", key: "x/1", value: "not an address", wantFormat: EtcdFormatGoZero, wantErr: "address"},
		{name: "broken json", key: "x/1", value: `{"address":`, wantErr: "not a known registration format"},
		{name: "unknown json", key: "x/1", value: `{"hello":"world"}`, wantErr: "not a known registration format"},
		{name: "empty value, no provider URL", key: "x/1", value: "", wantErr: "not a known registration format"},
		{name: "naming delete op", key: "x/1", value: `{"Op":1,"Addr":"10.0.0.1:1"}`, wantFormat: EtcdFormatNaming, wantErr: "Op 1"},
		{name: "kratos http only", key: "x/1", value: `{"endpoints":["http://10.0.0.1:80"]}`, wantFormat: EtcdFormatKratos, wantErr: "without a grpc"},
		{name: "go-micro no nodes", key: "x/1", value: `{"nodes":[]}`, wantFormat: EtcdFormatGoMicro, wantErr: "without nodes"},
		{name: "kitex udp", key: "x/1", value: `{"network":"udp","address":"10.0.0.1:1"}`, wantFormat: EtcdFormatKitex, wantErr: "network"},
		{name: "kitex negative weight", key: "x/1", value: `{"address":"10.0.0.1:1","weight":-1}`, wantFormat: EtcdFormatKitex, wantErr: "negative"},
		{name: "unspecified ip", key: "x/1", value: "0.0.0.0:80", wantFormat: EtcdFormatGoZero, wantErr: "unspecified"},
		{name: "port 0", key: "x/1", value: "10.0.0.1:0", wantFormat: EtcdFormatGoZero, wantErr: "port"},
		{name: "dubbo bad escape", key: "/dubbo/x/providers/%zz", value: "", wantFormat: EtcdFormatDubbo, wantErr: "dubbo provider URL"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, format, err := decodeEtcdValue(tc.key, []byte(tc.value), tc.format)
			if format != tc.wantFormat {
				t.Errorf("format = %q, want %q", format, tc.wantFormat)
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q (got %v)", err, tc.wantErr, got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, addrStrings(got)); diff != "" {
				t.Errorf("addresses mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// FuzzDecodeEtcdValue checks that no key or value crashes the decoder and
// that what it accepts is a well-formed address.
func FuzzDecodeEtcdValue(f *testing.F) {
	for _, kv := range [][2]string{
		{"k/1", kitexValue}, {"k/1", kratosValue}, {"k/1", goMicroValue}, {"k/1", namingValue},
		{dubboKey, ""}, {"k/1", "10.0.0.1:80"}, {"k/1", `{"nodes":[{"address":""}]}`},
	} {
		f.Add(kv[0], kv[1])
	}
	f.Fuzz(func(t *testing.T, key, value string) {
		addrs, _, err := decodeEtcdValue(key, []byte(value), "")
		if err != nil {
			return
		}
		if len(addrs) == 0 {
			t.Fatalf("decode(%q, %q) = no addresses and no error", key, value)
		}
		for _, a := range addrs {
			if _, err := ParseTarget(a.Addr); err != nil {
				t.Fatalf("decode(%q, %q) = address %q that does not parse: %v", key, value, a.Addr, err)
			}
			if a.Weight > MaxWeight {
				t.Fatalf("weight %d above MaxWeight", a.Weight)
			}
		}
	})
}
