package proxy

import (
	"strings"
	"testing"
	"time"
)

func TestParseTimeout(t *testing.T) {
	cases := []struct {
		in      string
		want    time.Duration
		wantErr bool
	}{
		{in: "1S", want: time.Second},
		{in: "100m", want: 100 * time.Millisecond},
		{in: "99999999H", want: time.Duration(1<<63 - 1)},
		{in: "5u", want: 5 * time.Microsecond},
		{in: "7n", want: 7},
		{in: "2M", want: 2 * time.Minute},
		{in: "", wantErr: true},
		{in: "S", wantErr: true},
		{in: "123456789S", wantErr: true}, // more than 8 digits
		{in: "-1S", wantErr: true},
		{in: "1s", wantErr: true}, // unit is case-sensitive
		{in: "1.5S", wantErr: true},
	}
	for _, tc := range cases {
		t.Run(tc.in, func(t *testing.T) {
			got, err := parseTimeout(tc.in)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Errorf("parseTimeout(%q) = %v, %v; want %v, error %v", tc.in, got, err, tc.want, tc.wantErr)
			}
		})
	}
}

func FuzzParseTimeout(f *testing.F) {
	for _, s := range []string{"1S", "100m", "99999999H", "5u", "7n", "", "123456789S", "-1S"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := parseTimeout(s)
		if err != nil {
			if d != 0 {
				t.Errorf("error with non-zero duration %v", d)
			}
			return
		}
		if d < 0 {
			t.Errorf("negative duration %v for %q", d, s)
		}
		if len(s) < 2 || len(s) > 9 || strings.ContainsAny(s[:len(s)-1], "+- .") {
			t.Errorf("accepted malformed %q", s)
		}
	})
}

// TestFormatTimeout: formatTimeout writes what parseTimeout reads back
// as at most the duration given, within a unit of its own (the rounding
// down to the finest unit that fits 8 digits).
func TestFormatTimeout(t *testing.T) {
	for _, tc := range []struct {
		in   time.Duration
		want string
	}{
		{in: 0, want: "0n"},
		{in: -time.Second, want: "0n"},
		{in: 7, want: "7n"},
		{in: 99999999, want: "99999999n"},
		{in: 100 * time.Millisecond, want: "100000u"},
		{in: 200*time.Millisecond + 999, want: "200000u"},
		{in: 2 * time.Minute, want: "120000m"},
		{in: 30 * time.Hour, want: "108000S"},
		{in: time.Duration(1<<63 - 1), want: "2562047H"},
	} {
		got := formatTimeout(tc.in)
		if got != tc.want {
			t.Errorf("formatTimeout(%v) = %q, want %q", tc.in, got, tc.want)
		}
		back, err := parseTimeout(got)
		if err != nil || back > max(tc.in, 0) {
			t.Errorf("parseTimeout(formatTimeout(%v) = %q) = %v, %v; want at most %v", tc.in, got, back, err, tc.in)
		}
	}
}

func FuzzFormatTimeout(f *testing.F) {
	for _, d := range []int64{0, 7, 99999999, 100000000, int64(time.Hour), 1<<63 - 1} {
		f.Add(d)
	}
	f.Fuzz(func(t *testing.T, n int64) {
		d := time.Duration(n)
		v := formatTimeout(d)
		back, err := parseTimeout(v)
		if err != nil {
			t.Fatalf("formatTimeout(%v) = %q, which parseTimeout refuses: %v", d, v, err)
		}
		if d > 0 && (back > d || d-back > d/100_000) {
			// Floored to the finest unit that fits 8 digits: the next
			// finer one did not, so the unit is at most d/10^5.
			t.Errorf("formatTimeout(%v) = %q = %v: more than it, or more than a unit below", d, v, back)
		}
	})
}

func TestClassifyPreface(t *testing.T) {
	cases := []struct {
		in   string
		want prefaceKind
	}{
		{in: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", want: prefaceSoFarOK},
		{in: "PRI", want: prefaceSoFarOK},
		{in: "P", want: prefaceSoFarOK},
		{in: "PO", want: prefaceUndecided},
		{in: "POST / HTTP/1.1", want: prefaceHTTP1},
		{in: "GET / HTTP/1.1\r\n", want: prefaceHTTP1},
		{in: "GE", want: prefaceUndecided},
		{in: "\x16\x03\x01", want: prefaceTLS}, // a TLS ClientHello
		{in: "\x16", want: prefaceTLS},
		{in: "PRX", want: prefaceGarbage},
	}
	for _, tc := range cases {
		if got := classifyPreface([]byte(tc.in)); got != tc.want {
			t.Errorf("classifyPreface(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func FuzzClassifyPreface(f *testing.F) {
	for _, s := range []string{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "GET / HTTP/1.1", "\x16\x03\x01", "PO"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		k := classifyPreface(b)
		// More bytes never turn a decided answer back into undecided.
		if k == prefaceHTTP1 || k == prefaceTLS || k == prefaceGarbage {
			if k2 := classifyPreface(append(b, 'x')); k2 != k {
				t.Errorf("classifyPreface(%q)=%v but with one more byte %v", b, k, k2)
			}
		}
	})
}

func TestEncodeGRPCMessage(t *testing.T) {
	cases := map[string]string{
		"plain":      "plain",
		"100%":       "100%25",
		"héllo ✓":    "h%C3%A9llo %E2%9C%93",
		"line\nnext": "line%0Anext",
	}
	for in, want := range cases {
		if got := encodeGRPCMessage(in); got != want {
			t.Errorf("encodeGRPCMessage(%q) = %q, want %q", in, got, want)
		}
	}
}
