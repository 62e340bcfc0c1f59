package cluster

import (
	"testing"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestH1PEMHalfWritten: a certificate chain or a CA bundle cut off in a
// PEM block (a file read while being written in place) does not load;
// whole, or with text around the blocks, it does.
func TestH1PEMHalfWritten(t *testing.T) {
	t.Parallel()
	ca, other := testkit.NewCA(t, "ca"), testkit.NewCA(t, "other")
	cert, key := ca.Issue(t, "leaf", true)
	chain := append(append([]byte{}, cert...), ca.PEM...)
	cut := chain[:len(cert)+len(ca.PEM)/2]
	if _, err := parseKeyPair([][]byte{chain, key}); err != nil {
		t.Errorf("whole chain: %v", err)
	}
	if _, err := parseKeyPair([][]byte{cut, key}); err == nil {
		t.Error("chain cut off in its intermediate loaded, want an error")
	} else {
		t.Logf("cut chain: %v", err)
	}
	bundle := append(append([]byte("# CAs\n"), ca.PEM...), other.PEM...)
	bundle = append(bundle, "# end\n"...)
	if _, err := parseCAs([][]byte{bundle}); err != nil {
		t.Errorf("whole bundle with comments: %v", err)
	}
	if _, err := parseCAs([][]byte{bundle[:len(ca.PEM)+len(other.PEM)/2]}); err == nil {
		t.Error("bundle cut off in its second CA loaded, want an error")
	}
}
