package cluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"strings"
	"testing"
	"time"
)

// TestAttackR3VerifyClientChain: verifyClientChain accepts what
// RequireAndVerifyClientCert did (a client certificate issued through an
// intermediate the client sends), and refuses a chain longer than
// maxClientChain before verifying it.
func TestAttackR3VerifyClientChain(t *testing.T) {
	serial := int64(0)
	issue := func(name string, isCA bool, eku []x509.ExtKeyUsage, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey) {
		t.Helper()
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		serial++
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			IsCA: isCA, BasicConstraintsValid: true, ExtKeyUsage: eku,
			KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign}
		if parent == nil {
			parent, parentKey = tmpl, key
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return c, key
	}
	root, rootKey := issue("root", true, nil, nil, nil)
	inter, interKey := issue("intermediate", true, nil, root, rootKey)
	leaf, _ := issue("client", false, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, inter, interKey)
	server, _ := issue("server", false, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, inter, interKey)
	cas := x509.NewCertPool()
	cas.AddCert(root)

	raw := func(cs ...*x509.Certificate) [][]byte {
		var r [][]byte
		for _, c := range cs {
			r = append(r, c.Raw)
		}
		return r
	}
	if err := verifyClientChain(raw(leaf, inter), cas); err != nil {
		t.Errorf("a client certificate with its intermediate: %v, want accepted", err)
	}
	for _, tc := range []struct {
		name  string
		chain [][]byte
		want  string
	}{
		{"no intermediate", raw(leaf), "unknown authority"},
		{"server certificate", raw(server, inter), "incompatible key usage"},
		{"too long", raw(leaf, inter, inter, inter, inter), "chain of 5 certificates, more than 4"},
		{"none", nil, "didn't provide"},
		{"garbage", [][]byte{[]byte("junk")}, "failed to parse"},
	} {
		if err := verifyClientChain(tc.chain, cas); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error saying %q", tc.name, err, tc.want)
		}
	}
}
