package proxy

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestNormalizeMethods(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		in      []string
		want    []string
		wantErr bool
	}{
		{name: "canonical method", in: []string{"/grpc.testing.TestService/EmptyCall"}, want: []string{"/grpc.testing.TestService/EmptyCall"}},
		{name: "without leading slash, as grpcurl writes it", in: []string{"grpc.testing.TestService/EmptyCall"}, want: []string{"/grpc.testing.TestService/EmptyCall"}},
		{name: "service with trailing slash", in: []string{"/grpc.testing.TestService/"}, want: []string{"/grpc.testing.TestService/"}},
		{name: "service without trailing slash", in: []string{"/grpc.testing.TestService"}, want: []string{"/grpc.testing.TestService/"}},
		{name: "bare service", in: []string{"echo.Echo"}, want: []string{"/echo.Echo/"}},
		{name: "spaces trimmed", in: []string{" echo.Echo/Say "}, want: []string{"/echo.Echo/Say"}},
		{name: "several", in: []string{"a.B/C", "/d.E"}, want: []string{"/a.B/C", "/d.E/"}},
		{name: "none", in: nil, want: []string{}},
		{name: "empty", in: []string{""}, wantErr: true},
		{name: "slash only", in: []string{"/"}, wantErr: true},
		{name: "three segments", in: []string{"/a.B/C/D"}, wantErr: true},
		{name: "empty package part", in: []string{"/a..B/C"}, wantErr: true},
		{name: "space inside", in: []string{"/a.B/C D"}, wantErr: true},
		{name: "leading digit", in: []string{"/1a.B/C"}, wantErr: true},
		{name: "a URL", in: []string{"http://x/y"}, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := normalizeMethods(tc.in)
			if (err != nil) != tc.wantErr {
				t.Fatalf("normalizeMethods(%q) error = %v, wantErr %v", tc.in, err, tc.wantErr)
			}
			if err == nil {
				if diff := cmp.Diff(tc.want, got); diff != "" {
					t.Errorf("normalizeMethods(%q) mismatch (-want +got):\n%s", tc.in, diff)
				}
			}
		})
	}
}

func FuzzNormalizeMethods(f *testing.F) {
	for _, s := range []string{"/grpc.testing.TestService/EmptyCall", "a.B", "/a.B/", "/", "", "/a/b/c", "é.x/y"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := normalizeMethods([]string{s})
		if err != nil {
			return
		}
		// Normal form is a fixed point.
		again, err := normalizeMethods(got)
		if err != nil || again[0] != got[0] {
			t.Fatalf("normalizeMethods(%q) = %q, then %q, %v", s, got[0], again, err)
		}
	})
}
