//go:build linux

package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/streamlb/streamlb/internal/testkit"
)

// procCPU returns the user and system CPU time of process pid.
func procCPU(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b)[strings.LastIndexByte(string(b), ')')+2:])
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+s) * 10 * time.Millisecond // USER_HZ 100
}

// junkChain returns a client certificate for key, issued under the name
// "junk-ca" by no one the proxy trusts, followed by n-1 self-signed CA
// certificates of that name, each with a key of its own: every one is a
// candidate issuer of the leaf whose signature check fails.
func junkChain(t *testing.T, n int, key *ecdsa.PrivateKey) [][]byte {
	t.Helper()
	issuer := pkix.Name{CommonName: "junk-ca"}
	mk := func(subject pkix.Name, isCA bool, pub any, signer *ecdsa.PrivateKey) []byte {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(len(subject.CommonName)) + time.Now().UnixNano()), Subject: subject,
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: isCA, BasicConstraintsValid: true,
			KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, &x509.Certificate{Subject: issuer}, pub, signer)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	signer, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	chain := [][]byte{mk(pkix.Name{CommonName: "leaf"}, false, &key.PublicKey, signer)}
	for len(chain) < n {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		chain = append(chain, mk(issuer, true, &k.PublicKey, k))
	}
	return chain
}

// TestAttackR3MTLSClientChain: with --tls-client-ca, crypto/tls verified
// whatever chain a client sent (RequireAndVerifyClientCert), and its
// search for the leaf's issuer among the client's intermediates stops
// only at 100 signature checks: a client sending 100 junk certificates
// under one issuer name (37 KB, no private key but the leaf's needed)
// cost the proxy 18 times the CPU of a handshake with a single untrusted
// certificate (about 8 ms against 0.45, unauthenticated; 300 cost 10.6
// ms). nginx bounds the chain (ssl_verify_depth, 1 by default), Envoy
// has max_verify_depth. Now a chain is at most 4 certificates: chains of
// the client CA up to that are served, a valid one of 5 is refused, and
// so is the junk (its cost is logged, not asserted: this machine's CPU
// figures move too much for a test).
func TestAttackR3MTLSClientChain(t *testing.T) {
	ctx := testkit.Context(t, 90*time.Second)
	ts := startBackend(t)
	dir := t.TempDir()
	ca, clientCA := testkit.NewCA(t, "server-ca"), testkit.NewCA(t, "client-ca")
	certFile, keyFile := ca.WriteIssued(t, dir, "server", true)
	p := startProc(t, "proxy", "--listen", "127.0.0.1:0", "--backend", ts.Addr(), "--log-format", "json",
		"--tls-cert", certFile, "--tls-key", keyFile, "--tls-client-ca", clientCA.WriteCA(t, dir, "client"))
	rec, _ := p.waitLog(ctx, t, 0, "listening")
	pid := p.cmd.Process.Pid

	// A client the CA issued is served.
	cPEM, kPEM := clientCA.Issue(t, "client", false)
	good, err := tls.X509KeyPair(cPEM, kPEM)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient("passthrough:///"+rec.Addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: ca.Pool(), ServerName: "127.0.0.1", Certificates: []tls.Certificate{good}})))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err = testgrpc.NewTestServiceClient(cc).EmptyCall(cctx, &testgrpc.Empty{})
	cancel()
	if err != nil {
		t.Fatalf("a call with a client certificate of the CA: %v, want OK", err)
	}

	// A CA of the test's own, with chains of 0 to 4 intermediates under
	// it: the proxy trusts its root through a second listener.
	type node struct {
		cert *x509.Certificate
		der  []byte
		key  *ecdsa.PrivateKey
	}
	serial := int64(1)
	issue := func(name string, parent *node, isCA bool) *node {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		serial++
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: isCA, BasicConstraintsValid: true,
			KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		signerCert, signerKey := tmpl, k
		if parent != nil {
			signerCert, signerKey = parent.cert, parent.key
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, signerCert, &k.PublicKey, signerKey)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return &node{cert: c, der: der, key: k}
	}
	root := issue("deep-root", nil, true)
	rootFile := dir + "/deep-root.pem"
	if err := os.WriteFile(rootFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.der}), 0o600); err != nil {
		t.Fatal(err)
	}
	deep := startProc(t, "proxy", "--listen", "127.0.0.1:0", "--backend", ts.Addr(), "--log-format", "json",
		"--tls-cert", certFile, "--tls-key", keyFile, "--tls-client-ca", rootFile)
	deepRec, _ := deep.waitLog(ctx, t, 0, "listening")
	call := func(chain []*node) error {
		leaf := issue("client", chain[len(chain)-1], false)
		cert := tls.Certificate{Certificate: [][]byte{leaf.der}, PrivateKey: leaf.key}
		for i := len(chain) - 1; i >= 1; i-- { // the intermediates, nearest first; not the root
			cert.Certificate = append(cert.Certificate, chain[i].der)
		}
		cc, err := grpc.NewClient("passthrough:///"+deepRec.Addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
			RootCAs: ca.Pool(), ServerName: "127.0.0.1", Certificates: []tls.Certificate{cert}})))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_, err = testgrpc.NewTestServiceClient(cc).EmptyCall(cctx, &testgrpc.Empty{})
		return err
	}
	chain := []*node{root}
	for n := 1; n <= 5; n++ { // n certificates sent: the leaf and n-1 intermediates
		err := call(chain)
		if n <= 4 && err != nil {
			t.Errorf("a chain of %d certificates of the client CA: %v, want served", n, err)
		}
		if n > 4 && err == nil {
			t.Errorf("a chain of %d certificates of the client CA was served, want refused (at most 4)", n)
		}
		chain = append(chain, issue(fmt.Sprintf("intermediate-%d", n), chain[len(chain)-1], true))
	}

	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	// perHandshake returns the proxy's CPU per handshake of a client
	// presenting chain, over about a second of handshakes.
	perHandshake := func(chain [][]byte) time.Duration {
		cert := tls.Certificate{Certificate: chain, PrivateKey: key}
		cfg := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"},
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }}
		before := procCPU(t, pid)
		start := time.Now()
		var mu sync.Mutex
		n := 0
		var wg sync.WaitGroup
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Since(start) < time.Second {
					c, err := tls.Dial("tcp", rec.Addr, cfg)
					if err == nil {
						// The verdict on the client's certificate comes
						// with the first read.
						c.SetReadDeadline(time.Now().Add(2 * time.Second))
						c.Read(make([]byte, 1))
						c.Close()
					}
					mu.Lock()
					n++
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		time.Sleep(50 * time.Millisecond)
		return (procCPU(t, pid) - before) / time.Duration(max(n, 1))
	}
	one := perHandshake(junkChain(t, 1, key))
	long := perHandshake(junkChain(t, 100, key))
	t.Logf("proxy CPU per handshake: %v with one untrusted certificate, %v with 100 junk certificates (%.1fx; 18x before the chain's bound)", one, long, float64(long)/float64(one))
}
