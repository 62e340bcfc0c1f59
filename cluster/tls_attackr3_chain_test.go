package cluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"log/slog"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/testkit"
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

	raw := func(cs ...*x509.Certificate) []*x509.Certificate { return cs }
	if err := verifyClientChain(raw(leaf, inter), cas); err != nil {
		t.Errorf("a client certificate with its intermediate: %v, want accepted", err)
	}
	for _, tc := range []struct {
		name  string
		chain []*x509.Certificate
		want  string
	}{
		{"no intermediate", raw(leaf), "unknown authority"},
		{"server certificate", raw(server, inter), "incompatible key usage"},
		{"too long", raw(leaf, inter, inter, inter, inter), "chain of 5 certificates, more than 4"},
		{"none", nil, "didn't provide"},
	} {
		if err := verifyClientChain(tc.chain, cas); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error saying %q", tc.name, err, tc.want)
		}
	}
}

// TestAttackR3ClientCAResumption: a client whose CA the reloaded
// --tls-client-ca no longer holds is refused, on a resumed session too
// (a session ticket from before the reload): the chain is verified again
// on resumption, as crypto/tls does for RequireAndVerifyClientCert.
func TestAttackR3ClientCAResumption(t *testing.T) {
	dir := t.TempDir()
	ca, oldCA, newClientCA := testkit.NewCA(t, "ca"), testkit.NewCA(t, "old-client-ca"), testkit.NewCA(t, "new-client-ca")
	certPEM, keyPEM := ca.Issue(t, "server", true)
	st := ServerTLS{
		CertFile:     testkit.WriteFile(t, dir, "tls.crt", certPEM),
		KeyFile:      testkit.WriteFile(t, dir, "tls.key", keyPEM),
		ClientCAFile: testkit.WriteFile(t, dir, "ca.crt", oldCA.PEM),
	}
	s, err := newServerTLS(st, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", s.config())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				if c.(*tls.Conn).Handshake() == nil {
					c.Write([]byte("x")) // the session ticket goes first
					c.Read(make([]byte, 1))
				}
			}()
		}
	}()
	clientCert, err := tls.X509KeyPair(oldCA.Issue(t, "client", false))
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{RootCAs: ca.Pool(), ServerName: "127.0.0.1", NextProtos: []string{"h2"},
		Certificates: []tls.Certificate{clientCert}, ClientSessionCache: tls.NewLRUClientSessionCache(4)}
	dial := func() (resumed bool, err error) {
		c, err := tls.Dial("tcp", ln.Addr().String(), cfg)
		if err != nil {
			return false, err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err != nil { // the client's certificate is judged by now
			return false, err
		}
		return c.ConnectionState().DidResume, nil
	}
	if _, err := dial(); err != nil {
		t.Fatalf("a client of the CA in use: %v", err)
	}
	if resumed, err := dial(); err != nil || !resumed {
		t.Fatalf("a second connection: resumed %v, %v; want a resumed session", resumed, err)
	}
	testkit.WriteFile(t, dir, "ca.crt", newClientCA.PEM)
	time.Sleep(ReloadInterval + 100*time.Millisecond)
	if resumed, err := dial(); err == nil {
		t.Errorf("a client of the CA the reload dropped was served (resumed %v), want it refused", resumed)
	}
}
