package proxy

import (
	"testing"

	"golang.org/x/net/http2/hpack"
)

// TestLoopedCountsPasses: a request is taken for a forwarding loop only
// once it carries the proxy's own token maxLoopPasses times. A service
// that calls another through the same proxy, with every incoming header
// copied onto its outgoing call, carries the token once on its second
// pass, and must be relayed; other proxies' tokens do not count.
func TestLoopedCountsPasses(t *testing.T) {
	const own = "00112233aabbccdd"
	fields := []hpack.HeaderField{{Name: ":path", Value: "/s/M"}, {Name: loopHeader, Value: "ffeeddccbbaa9988"}}
	for passes := range maxLoopPasses + 2 {
		if got, want := looped(fields, own), passes >= maxLoopPasses; got != want {
			t.Errorf("with %d passes of its own: looped = %v, want %v", passes, got, want)
		}
		fields = append(fields, hpack.HeaderField{Name: loopHeader, Value: own})
	}
	if looped([]hpack.HeaderField{{Name: loopHeader, Value: "x"}, {Name: loopHeader, Value: "x"}, {Name: loopHeader, Value: "x"}}, own) {
		t.Error("three passes of another proxy taken for a loop of this one")
	}
	if maxLoopPasses < 2 {
		t.Errorf("maxLoopPasses = %d, want at least 2: a hairpin through the proxy is no loop", maxLoopPasses)
	}
}
