package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/streamlb/streamlb/internal/fileread"
	"github.com/streamlb/streamlb/proxy"
	"google.golang.org/grpc/credentials"
)

// ServerTLS configures TLS termination of client connections. The files
// are PEM. They are read by NewServer, which fails if they do not load,
// and then again at most once a [ReloadInterval] when a client connects:
// files that changed (a Kubernetes Secret mounted as a volume is swapped
// atomically through a symlink) are used for new connections from then
// on, and connections already open keep theirs. A change that does not
// load is logged and the files in use are kept.
type ServerTLS struct {
	// CertFile and KeyFile hold the certificate chain (leaf first) and its
	// private key. Both are required.
	CertFile, KeyFile string
	// ClientCAFile, if set, holds the CA certificates that client
	// certificates must chain to; clients without a valid certificate are
	// refused in the handshake (mutual TLS).
	ClientCAFile string
}

// BackendTLS configures TLS on the connections to a cluster's backends:
// the data plane's and the health checks'. The files are PEM and are read
// by New, which fails if they do not load. The client certificate is
// reloaded as [ServerTLS]'s are; the CA file is read once.
type BackendTLS struct {
	// CAFile holds the CA certificates that backend certificates must chain
	// to. Required.
	CAFile string
	// ServerName is the name backend certificates are checked against
	// (and sent as SNI). "" means each backend's host as dialed, usually an
	// IP address, which the certificate must then hold as an IP SAN.
	ServerName string
	// CertFile and KeyFile, if set, hold the client certificate presented
	// to backends (mutual TLS). Both or neither.
	CertFile, KeyFile string
}

// ReloadInterval is the least time between two reads of the TLS files.
const ReloadInterval = time.Second

// minTLSVersion is the oldest TLS version offered or accepted. TLS 1.2 is
// what RFC 9113 §9.2 requires of HTTP/2.
const minTLSVersion = tls.VersionTLS12

// reloading is a value parsed from files that are read again, at most
// once every ReloadInterval, when the value is asked for. Its methods are
// safe for concurrent use.
type reloading[T any] struct {
	what   string   // names the value in logs
	files  []string // read in this order and handed to parse
	parse  func(data [][]byte) (T, error)
	logger *slog.Logger
	now    func() time.Time

	mu sync.Mutex
	// mu guards the fields below.
	next   time.Time // no read before this
	data   [][]byte  // the contents val was parsed from
	bad    [][]byte  // the last contents that failed to parse (logged once)
	unread bool      // the last read failed (logged once)
	val    T
}

func newReloading[T any](what string, files []string, parse func([][]byte) (T, error), logger *slog.Logger) (*reloading[T], error) {
	r := &reloading[T]{what: what, files: files, parse: parse, logger: logger, now: time.Now}
	data, err := r.read()
	if err != nil {
		return nil, err
	}
	if r.val, err = parse(data); err != nil {
		return nil, fmt.Errorf("cluster: %s %v: %w", what, files, err)
	}
	r.data = data
	r.next = r.now().Add(ReloadInterval)
	return r, nil
}

func (r *reloading[T]) read() ([][]byte, error) {
	data := make([][]byte, len(r.files))
	for i, f := range r.files {
		b, err := fileread.Regular(f) // never blocks: get holds mu
		if err != nil {
			return nil, fmt.Errorf("cluster: %s: %w", r.what, err)
		}
		data[i] = b
	}
	return data, nil
}

// get returns the current value, first reading the files again if
// ReloadInterval has passed since they were last read. Contents are
// compared rather than modification times, which a swapped symlink or a
// coarse clock can leave unchanged.
func (r *reloading[T]) get() T {
	r.mu.Lock()
	now := r.now()
	if now.Before(r.next) {
		v := r.val
		r.mu.Unlock()
		return v
	}
	r.next = now.Add(ReloadInterval)
	var logErr error
	reloaded := false
	data, err := r.read()
	switch {
	case err != nil:
		// A file missing halfway through a swap is read again next time;
		// say so once per run of failures.
		if !r.unread {
			logErr = err
		}
		r.unread, r.bad = true, nil
	case equalData(data, r.data):
		r.unread = false
		r.bad = nil // back to what is in use: a new failure is news again
	case equalData(data, r.bad):
	default:
		r.unread = false
		v, err := r.parse(data)
		if err != nil {
			r.bad = data
			logErr = err
			break
		}
		r.val, r.data, r.bad = v, data, nil
		reloaded = true
	}
	v := r.val
	r.mu.Unlock()
	// Logged after unlocking: a logger may block.
	if logErr != nil {
		r.logger.Error("TLS files changed but do not load; keeping the ones in use", "what", r.what, "files", r.files, "err", logErr)
	} else if reloaded {
		r.logger.Info("TLS files reloaded", "what", r.what, "files", r.files)
	}
	return v
}

// pemComplete fails if data holds a PEM block that begins and does not
// end: a file read while it is being written in place, cut off in a
// block. crypto/tls and x509 stop at such a block and keep the blocks
// before it, so a CA bundle or a certificate chain read halfway would
// load as its first CAs or its leaf alone; refused, the files in use are
// kept until the file is whole (reloading.get).
func pemComplete(data []byte) error {
	rest := data
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
	}
	if bytes.Contains(rest, []byte("-----BEGIN")) {
		return errors.New("a PEM block begins and does not end (the file is still being written?)")
	}
	return nil
}

func equalData(a, b [][]byte) bool {
	if len(a) != len(b) || a == nil || b == nil {
		return false
	}
	for i := range a {
		if !bytes.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}

func parseKeyPair(data [][]byte) (*tls.Certificate, error) {
	for i, what := range []string{"certificate", "key"} {
		if err := pemComplete(data[i]); err != nil {
			return nil, fmt.Errorf("%s file: %w", what, err)
		}
	}
	c, err := tls.X509KeyPair(data[0], data[1])
	if err != nil {
		return nil, err
	}
	return &c, nil
}

func parseCAs(data [][]byte) (*x509.CertPool, error) {
	if err := pemComplete(data[0]); err != nil {
		return nil, err
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(data[0]) {
		return nil, errors.New("no PEM certificate found")
	}
	return p, nil
}

// serverTLS builds the tls.Config of each client handshake from the
// current files.
type serverTLS struct {
	cert *reloading[*tls.Certificate]
	cas  *reloading[*x509.CertPool] // nil without client certificates
	cur  atomic.Pointer[serverTLSConfig]
}

// serverTLSConfig is the config built for one certificate and CA pool.
type serverTLSConfig struct {
	cert *tls.Certificate
	cas  *x509.CertPool
	cfg  *tls.Config
}

func newServerTLS(st ServerTLS, logger *slog.Logger) (*serverTLS, error) {
	if st.CertFile == "" || st.KeyFile == "" {
		return nil, errors.New("cluster: TLS needs both a certificate and a key file")
	}
	var s serverTLS
	var err error
	if s.cert, err = newReloading("certificate", []string{st.CertFile, st.KeyFile}, parseKeyPair, logger); err != nil {
		return nil, err
	}
	if st.ClientCAFile != "" {
		if s.cas, err = newReloading("client CA", []string{st.ClientCAFile}, parseCAs, logger); err != nil {
			return nil, err
		}
	}
	return &s, nil
}

// config is the listener's tls.Config: every handshake gets the config of
// the files current then.
func (s *serverTLS) config() *tls.Config {
	return &tls.Config{
		MinVersion:         minTLSVersion,
		NextProtos:         []string{http2.NextProtoTLS},
		GetConfigForClient: s.configForClient,
	}
}

func (s *serverTLS) configForClient(*tls.ClientHelloInfo) (*tls.Config, error) {
	cert := s.cert.get()
	var cas *x509.CertPool
	if s.cas != nil {
		cas = s.cas.get()
	}
	if c := s.cur.Load(); c != nil && c.cert == cert && c.cas == cas {
		return c.cfg, nil
	}
	cfg := &tls.Config{
		MinVersion: minTLSVersion,
		// RFC 9113 §3.2: HTTP/2 over TLS is negotiated with ALPN "h2". A
		// client that offers ALPN without it is refused in the handshake.
		NextProtos:   []string{http2.NextProtoTLS},
		Certificates: []tls.Certificate{*cert},
	}
	if cas != nil {
		// RequireAndVerifyClientCert would have crypto/tls verify any
		// chain the client sends: its search through a client's
		// intermediates stops at 100 signature checks, so 100 junk
		// certificates under one issuer name cost the proxy about 8 ms
		// of CPU per handshake, 18 times a normal one (attack round 3).
		// The chain's length is checked first, as nginx's
		// ssl_verify_depth and Envoy's max_verify_depth bound it.
		// VerifyConnection, unlike VerifyPeerCertificate, also runs on
		// resumed sessions, whose chain is then verified again against
		// the CAs current now, as crypto/tls does for
		// RequireAndVerifyClientCert.
		cfg.ClientAuth = tls.RequireAnyClientCert
		cfg.ClientCAs = cas // the CA names sent in CertificateRequest
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			return verifyClientChain(cs.PeerCertificates, cas)
		}
	}
	// Concurrent handshakes may build the same config twice; either will do.
	s.cur.Store(&serverTLSConfig{cert: cert, cas: cas, cfg: cfg})
	return cfg, nil
}

// maxClientChain is the longest client certificate chain accepted: the
// client's certificate and up to three intermediates. With n
// intermediates under one name the chain search makes up to about n!·e
// signature checks: 15 for three.
const maxClientChain = 4

// verifyClientChain verifies a client's certificate chain against cas as
// crypto/tls's RequireAndVerifyClientCert does, once its length is
// within maxClientChain.
func verifyClientChain(certs []*x509.Certificate, cas *x509.CertPool) error {
	if len(certs) == 0 {
		return errors.New("tls: client didn't provide a certificate")
	}
	if len(certs) > maxClientChain {
		return fmt.Errorf("tls: client certificate chain of %d certificates, more than %d", len(certs), maxClientChain)
	}
	opts := x509.VerifyOptions{
		Roots:         cas,
		Intermediates: x509.NewCertPool(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	for _, c := range certs[1:] {
		opts.Intermediates.AddCert(c)
	}
	if _, err := certs[0].Verify(opts); err != nil {
		return fmt.Errorf("tls: failed to verify client certificate: %w", err)
	}
	return nil
}

// tlsListener terminates TLS on the connections ln accepts. The handshake
// runs on the connection's first Read, in the goroutine that serves it,
// never in Accept's.
type tlsListener struct {
	net.Listener
	cfg *tls.Config
}

func (l *tlsListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &tlsServerConn{Conn: tls.Server(proxy.WrapSocket(nc), l.cfg)}, nil
}

// tlsServerConn is a server-side TLS connection that answers a client
// speaking cleartext with something it can understand. Read must not be
// called concurrently (the data plane reads from one goroutine).
type tlsServerConn struct {
	*tls.Conn
	shook bool // handshake done (or failed): Read goes straight through
}

func (c *tlsServerConn) Read(b []byte) (int, error) {
	if !c.shook {
		c.shook = true
		// The handshake honours the read deadline the data plane set
		// for the connection preface.
		if err := c.Conn.Handshake(); err != nil {
			return 0, rejectCleartext(err)
		}
	}
	return c.Conn.Read(b)
}

// rejectCleartext answers a client that did not start with a TLS
// handshake, if its first bytes say what it speaks, and returns the error
// to log.
func rejectCleartext(err error) error {
	var re tls.RecordHeaderError
	if !errors.As(err, &re) || re.Conn == nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	re.Conn.SetWriteDeadline(time.Now().Add(time.Second))
	switch h := string(re.RecordHeader[:]); {
	case h == http2.ClientPreface[:len(h)]:
		// A GOAWAY is the first thing an h2c client can read; its debug
		// data says why (RFC 9113 §6.8).
		http2.NewFramer(re.Conn, nil).WriteGoAway(0, http2.ErrCodeProtocol, []byte("streamlb: this port expects TLS"))
		return errors.New("cleartext HTTP/2 (h2c) on a TLS port")
	case h == "GET /" || h == "POST " || h == "HEAD " || h == "PUT /" || h == "OPTIO":
		// As net/http answers HTTP on an HTTPS port.
		fmt.Fprint(re.Conn, "HTTP/1.0 400 Bad Request\r\n\r\nstreamlb: this port expects TLS\n")
		return errors.New("cleartext HTTP/1.x on a TLS port")
	}
	return fmt.Errorf("TLS handshake: %w", err)
}

// backendTLS dials backends over TLS. Its methods are safe for concurrent
// use.
type backendTLS struct {
	base *tls.Config // RootCAs, ServerName, client certificate
}

func newBackendTLS(bt BackendTLS, logger *slog.Logger) (*backendTLS, error) {
	if bt.CAFile == "" {
		return nil, errors.New("cluster: backend TLS needs a CA file")
	}
	if (bt.CertFile == "") != (bt.KeyFile == "") {
		return nil, errors.New("cluster: a backend TLS client certificate needs both a certificate and a key file")
	}
	pem, err := fileread.Regular(bt.CAFile)
	if err != nil {
		return nil, fmt.Errorf("cluster: backend CA: %w", err)
	}
	cas, err := parseCAs([][]byte{pem})
	if err != nil {
		return nil, fmt.Errorf("cluster: backend CA %s: %w", bt.CAFile, err)
	}
	cfg := &tls.Config{
		MinVersion: minTLSVersion,
		NextProtos: []string{http2.NextProtoTLS},
		RootCAs:    cas,
		ServerName: bt.ServerName,
	}
	if bt.CertFile != "" {
		cert, err := newReloading("backend client certificate", []string{bt.CertFile, bt.KeyFile}, parseKeyPair, logger)
		if err != nil {
			return nil, err
		}
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert.get(), nil }
	}
	return &backendTLS{base: cfg}, nil
}

// dial is the data plane's proxy.Config.Dial: a TCP connection with the
// TLS handshake done, within ctx, and HTTP/2 negotiated.
func (b *backendTLS) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	cfg := b.base
	if cfg.ServerName == "" {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("cluster: backend address %q: %w", addr, err)
		}
		cfg = cfg.Clone()
		cfg.ServerName = host
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(proxy.WrapSocket(nc), cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		nc.Close()
		return nil, fmt.Errorf("TLS handshake: %w", err)
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != http2.NextProtoTLS {
		tc.Close()
		return nil, fmt.Errorf("TLS: backend negotiated ALPN protocol %q, not %q (RFC 9113 §3.2)", p, http2.NextProtoTLS)
	}
	return tc, nil
}

// credentials returns the same TLS for grpc-go clients: the health checks
// and the reference engine. grpc-go takes each backend's host as dialed
// for the server name when none is set, as dial does, and checks ALPN
// itself.
func (b *backendTLS) credentials() credentials.TransportCredentials {
	return credentials.NewTLS(b.base)
}
