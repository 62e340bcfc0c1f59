package proxy

import (
	"testing"

	"golang.org/x/net/http/httpguts"
)

// runeWireName is the rune-by-rune check validWireHeaderFieldName replaced
// (x/net/http2's validWireHeaderFieldName).
func runeWireName(v string) bool {
	if len(v) == 0 {
		return false
	}
	for _, r := range v {
		if !httpguts.IsTokenRune(r) || 'A' <= r && r <= 'Z' {
			return false
		}
	}
	return true
}

// TestValidWireHeaderFieldName checks the byte table against the rune
// check on every string of up to two bytes (every byte, every pair: ASCII,
// upper case, UTF-8 lead and continuation bytes) and a few longer ones.
func TestValidWireHeaderFieldName(t *testing.T) {
	t.Parallel()
	check := func(v string) {
		t.Helper()
		if got, want := validWireHeaderFieldName(v), runeWireName(v); got != want {
			t.Fatalf("validWireHeaderFieldName(%q) = %v, want %v", v, got, want)
		}
	}
	check("")
	for a := range 256 {
		check(string([]byte{byte(a)}))
		for b := range 256 {
			check(string([]byte{byte(a), byte(b)}))
		}
	}
	for _, v := range []string{"content-type", "grpc-timeout", "x-backend", "Content-Type", "x-é", "x\u00a0y", "a\xffb", "te", "x-a_b.c~d!#$%&'*+^`|"} {
		check(v)
	}
}
