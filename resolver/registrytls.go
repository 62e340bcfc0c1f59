package resolver

// TLS and error plumbing shared by the registry resolvers: the client TLS
// configuration from files, and the recording of connection failures that
// etcd's client and go-zookeeper would otherwise hide behind a timeout.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/go-zookeeper/zk"
	"google.golang.org/grpc/credentials"

	"github.com/streamlb/streamlb/internal/fileread"
)

// tlsErrors remembers the last TLS failure of an etcd client's
// connections. etcd's client waits for a connection until the request's
// deadline and then reports only "context deadline exceeded"; the reason —
// a server certificate from an unknown CA, a client certificate the server
// refused — is seen only by the connection, so the resolver records it
// there and adds it to the error it logs and reports.
//
// The ZooKeeper resolver uses it too, for every dial error: go-zookeeper
// retries dials silently, so a session that never comes says only that.
type tlsErrors struct {
	label string // how annotate introduces the error: "last TLS error"

	mu   sync.Mutex // guards last
	last error
}

// record keeps err as the last TLS failure.
func (r *tlsErrors) record(err error) {
	r.mu.Lock()
	r.last = err
	r.mu.Unlock()
}

// take returns the last TLS failure since the previous take, if any, and
// forgets it.
func (r *tlsErrors) take() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	err := r.last
	r.last = nil
	return err
}

// annotate adds the last TLS failure, if any, to err.
func (r *tlsErrors) annotate(err error) error {
	if r == nil || err == nil {
		return err
	}
	if terr := r.take(); terr != nil {
		return fmt.Errorf("%w (%s: %v)", err, r.label, terr)
	}
	return err
}

// recordingCreds is grpc's TLS transport credentials, recording the
// handshake's failures, and the alerts the server sends after it (with TLS
// 1.3 a server that rejects the client's certificate says so only after
// the client has finished its handshake), in errs.
type recordingCreds struct {
	credentials.TransportCredentials
	errs *tlsErrors
}

func newRecordingCreds(cfg *tls.Config, errs *tlsErrors) *recordingCreds {
	return &recordingCreds{TransportCredentials: credentials.NewTLS(cfg), errs: errs}
}

func (c *recordingCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ClientHandshake(ctx, authority, raw)
	if err != nil {
		c.errs.record(fmt.Errorf("handshake with %s: %w", authority, err))
		return nil, nil, err
	}
	return &recordingConn{Conn: conn, authority: authority, errs: c.errs}, info, nil
}

func (c *recordingCreds) Clone() credentials.TransportCredentials {
	return &recordingCreds{TransportCredentials: c.TransportCredentials.Clone(), errs: c.errs}
}

// recordingConn records the TLS alerts read on a handshaken connection.
type recordingConn struct {
	net.Conn
	authority string
	errs      *tlsErrors
}

func (c *recordingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	// crypto/tls reports an alert from the peer as an *net.OpError with
	// Op "remote error", e.g. "remote error: tls: certificate required".
	var oe *net.OpError
	if err != nil && errors.As(err, &oe) && oe.Op == "remote error" {
		c.errs.record(fmt.Errorf("%s: %w", c.authority, err))
	}
	return n, err
}

// clientTLS reads a registry client's TLS files: a PEM CA file (empty: the
// system's CAs) and a PEM client certificate and key (empty: none). It
// returns nil, cleartext, if caFile and certFile are both empty.
func clientTLS(registry, caFile, certFile, keyFile string) (*tls.Config, error) {
	if caFile == "" && certFile == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := fileread.Regular(caFile)
		if err != nil {
			return nil, fmt.Errorf("resolver: %s CA: %w", registry, err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("resolver: %s CA %s: no PEM certificate", registry, caFile)
		}
	}
	if certFile != "" {
		cert, err := loadKeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("resolver: %s client certificate: %w", registry, err)
		}
		kp := &clientKeyPair{certFile: certFile, keyFile: keyFile, cert: &cert, next: time.Now().Add(clientCertReload)}
		cfg.GetClientCertificate = kp.get
	}
	return cfg, nil
}

// clientCertReload is the least time between two reads of a registry
// client certificate's files.
const clientCertReload = time.Second

// clientKeyPair is a registry client's certificate, read again from its
// files at most once a clientCertReload when a connection asks for it,
// as the backend client certificate is: rotated in place (cert-manager, a
// Kubernetes Secret), it is used from the next connection on. Read once,
// the registry kept getting the old one, until it expired or its CA was
// no longer trusted, and a reload kept the cluster and so the old one
// (its settings, the file paths, had not changed): only a restart helped.
// Files that do not load (one of the two rewritten, or cut off while
// being written) leave the pair in use. Safe for concurrent use.
type clientKeyPair struct {
	certFile, keyFile string

	mu   sync.Mutex // guards the fields below
	next time.Time  // no read before this
	cert *tls.Certificate
}

func (k *clientKeyPair) get(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if now := time.Now(); !now.Before(k.next) {
		k.next = now.Add(clientCertReload)
		if c, err := loadKeyPair(k.certFile, k.keyFile); err == nil {
			k.cert = &c
		}
	}
	return k.cert, nil
}

// loadKeyPair is tls.LoadX509KeyPair, reading the files as the
// configuration's TLS files are read (fileread.Regular): a FIFO or a
// device put in their place is refused, not waited on or read for ever.
func loadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	certPEM, err := fileread.Regular(certFile)
	if err != nil {
		return tls.Certificate{}, err
	}
	keyPEM, err := fileread.Regular(keyFile)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.X509KeyPair(certPEM, keyPEM)
}

// zkDialer dials ZooKeeper for go-zookeeper, over TLS if tls is set, and
// records the dial and TLS failures in errs: go-zookeeper retries them
// silently, and the resolver adds the last one to the error it reports.
type zkDialer struct {
	dial zk.Dialer
	tls  *tls.Config
	errs *tlsErrors
}

// Dial is a zk.Dialer. The TLS handshake is done here, within timeout, so
// that its failure is a dial failure.
func (d *zkDialer) Dial(network, address string, timeout time.Duration) (net.Conn, error) {
	conn, err := d.dial(network, address, timeout)
	if err == nil && d.tls != nil {
		cfg := d.tls.Clone()
		if cfg.ServerName == "" {
			cfg.ServerName, _, _ = net.SplitHostPort(address)
		}
		tc := tls.Client(conn, cfg)
		_ = tc.SetDeadline(time.Now().Add(timeout))
		if err = tc.Handshake(); err != nil {
			conn.Close()
			err = fmt.Errorf("handshake with %s: %w", address, err)
		} else {
			_ = tc.SetDeadline(time.Time{})
			// With TLS 1.3 a refused client certificate is an alert read
			// after the handshake.
			conn = &recordingConn{Conn: tc, authority: address, errs: d.errs}
		}
	}
	if err != nil {
		d.errs.record(err)
		return nil, err
	}
	return conn, nil
}
