//go:build linux

// Command idleconns measures the memory a server holds per idle HTTP/2
// client connection (issue 12): it reads the server process's RSS, opens N
// connections that each complete the HTTP/2 handshake (preface, SETTINGS
// both ways, both acknowledged) and then stay idle, waits for the server to
// settle, reads the RSS again and prints (after - before) / N. It is the
// idle-connection step of loadtest/bench/run.sh; the connections speak
// cleartext HTTP/2 (h2c) to 127.0.0.1 only.
//
//	go run ./loadtest/bench/idleconns -target 127.0.0.1:8080 -pid PID -n 5000
//
// With -call PATH, each connection first makes one gRPC unary call to PATH
// (an empty message, as grpc.testing.TestService/EmptyCall takes) and
// then stays idle: what an idle connection of a real client holds, its
// HPACK tables and whatever its call left behind included.
//
// With -cacert FILE, the connections speak TLS instead (ALPN h2, the
// server's certificate verified against the PEM CAs in FILE for the name
// -servername, localhost by default), as loadtest/bench/gen's -cacert: what
// an idle connection costs a proxy terminating TLS. The handshake counted
// is then TLS's and HTTP/2's; the session tickets a TLS 1.3 server sends
// after it are read (and kept, by crypto/tls's client, which has no
// session cache here) by the watcher of each connection.
//
// The output is one line of JSON. It exits 1 if fewer than N connections
// complete the handshake (and the call) or stay open until the second
// reading.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

type result struct {
	Target       string `json:"target"`
	Call         string `json:"call,omitempty"`
	TLS          bool   `json:"tls,omitempty"`
	PIDs         []int  `json:"pids"`
	Conns        int    `json:"conns"`
	Handshaken   int    `json:"handshaken"`
	OpenAtEnd    int    `json:"open_at_end"`
	RSSBeforeKiB int64  `json:"rss_before_kib"`
	RSSAfterKiB  int64  `json:"rss_after_kib"`
	// The same for RssAnon (heap, stacks): what the connections cost,
	// without the file-backed pages of the binary that VmRSS also counts.
	AnonBeforeKiB  int64   `json:"rss_anon_before_kib"`
	AnonAfterKiB   int64   `json:"rss_anon_after_kib"`
	AnonKiBPerConn float64 `json:"anon_kib_per_conn"`
	BytesPerConn   float64 `json:"bytes_per_conn"`
	KiBPerConn     float64 `json:"kib_per_conn"`
	HandshakeSecs  float64 `json:"handshake_secs"`
	SettleSecs     float64 `json:"settle_secs"`
	FirstDialError string  `json:"first_error,omitempty"`
}

func main() {
	target := flag.String("target", "", "server HOST:PORT (127.0.0.0/8 only)")
	pidList := flag.String("pid", "", "comma-separated PIDs whose summed RSS is measured (the server process, and its workers)")
	n := flag.Int("n", 5000, "idle connections to open")
	settle := flag.Duration("settle", 2*time.Second, "wait after the last handshake before the second RSS reading")
	timeout := flag.Duration("timeout", 60*time.Second, "bound on opening all connections")
	call := flag.String("call", "", "gRPC method path (/pkg.Service/Method) each connection calls once, with an empty message, before it goes idle")
	caFile := flag.String("cacert", "", "PEM CA `FILE`: speak TLS (ALPN h2), verifying the server's certificate against it")
	serverName := flag.String("servername", "localhost", "with -cacert: the name the server's certificate is checked against (and sent as SNI)")
	flag.Parse()
	var tlsCfg *tls.Config
	if *caFile != "" {
		var err error
		if tlsCfg, err = clientTLS(*caFile, *serverName); err != nil {
			fmt.Fprintln(os.Stderr, "idleconns:", err)
			os.Exit(2)
		}
	}
	res, err := run(*target, *pidList, *n, *settle, *timeout, *call, tlsCfg)
	if res != nil {
		json.NewEncoder(os.Stdout).Encode(res)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "idleconns:", err)
		os.Exit(1)
	}
}

// clientTLS is the TLS config of -cacert and -servername.
func clientTLS(caFile, serverName string) (*tls.Config, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificates", caFile)
	}
	return &tls.Config{RootCAs: pool, ServerName: serverName, NextProtos: []string{http2.NextProtoTLS}}, nil
}

// run opens the connections, takes the readings and closes the
// connections again; with tlsCfg not nil they speak TLS with it. With an
// error it may still return a result: the readings of a run in which not
// every connection stayed open.
func run(target, pidList string, n int, settle, timeout time.Duration, call string, tlsCfg *tls.Config) (*result, error) {
	host, _, err := net.SplitHostPort(target)
	if err != nil {
		return nil, fmt.Errorf("target %q: %w", target, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return nil, fmt.Errorf("target %q: only loopback addresses", target)
	}
	if n <= 0 || n > 100000 {
		return nil, fmt.Errorf("-n %d: want 1..100000", n)
	}
	if call != "" && !strings.HasPrefix(call, "/") {
		return nil, fmt.Errorf("-call %q: want a method path, /pkg.Service/Method", call)
	}
	var pids []int
	for _, s := range strings.Split(pidList, ",") {
		p, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || p <= 0 {
			return nil, fmt.Errorf("-pid %q: want comma-separated process ids", pidList)
		}
		pids = append(pids, p)
	}
	if err := raiseNoFile(uint64(n) + 256); err != nil {
		return nil, err
	}
	// One connection first, handshaken and closed, so the server has run
	// its accept and handshake code before the first reading: the pages
	// of its binary that this maps are no cost per connection. A proxy
	// that released its start-up pages (streamlb's
	// --release-startup-pages) would otherwise count them against the n
	// connections: about 2 MiB, 0.4 KiB each of 5,000.
	wctx, wcancel := context.WithTimeout(context.Background(), timeout)
	wc, err := handshake(wctx, target, call, tlsCfg)
	wcancel()
	if err != nil {
		return nil, fmt.Errorf("warm-up connection: %w", err)
	}
	wc.Close()
	time.Sleep(200 * time.Millisecond) // a measurement delay, not synchronisation
	before, err := rssKiB(pids, "VmRSS:")
	if err != nil {
		return nil, err
	}
	anonBefore, err := rssKiB(pids, "RssAnon:")
	if err != nil {
		return nil, err
	}

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conns := make([]net.Conn, n)
	var open atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	start := time.Now()
	next := make(chan int)
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				c, err := handshake(ctx, target, call, tlsCfg)
				if err != nil {
					errOnce.Do(func() { firstErr = err })
					continue
				}
				conns[i] = c
				open.Add(1)
			}
		}()
	}
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	res := result{Target: target, Call: call, TLS: tlsCfg != nil, PIDs: pids, Conns: n, HandshakeSecs: time.Since(start).Seconds()}
	res.Handshaken = int(open.Load())
	if firstErr != nil {
		res.FirstDialError = firstErr.Error()
	}
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()

	// Watch every connection: a connection counts as closed when the
	// server closes it or sends GOAWAY. Frames that come after the
	// handshake (a WINDOW_UPDATE, a PING) are read past.
	var closed atomic.Int64
	for _, c := range conns {
		if c == nil {
			continue
		}
		go func(c net.Conn) {
			fr := http2.NewFramer(nil, c)
			for {
				f, err := fr.ReadFrame()
				if err != nil {
					if !errors.Is(err, net.ErrClosed) {
						closed.Add(1)
					}
					return
				}
				if _, ok := f.(*http2.GoAwayFrame); ok {
					closed.Add(1)
					return
				}
			}
		}(c)
	}
	time.Sleep(settle) // a measurement delay, not synchronisation
	after, err := rssKiB(pids, "VmRSS:")
	if err != nil {
		return nil, err
	}
	anonAfter, err := rssKiB(pids, "RssAnon:")
	if err != nil {
		return nil, err
	}
	res.AnonBeforeKiB, res.AnonAfterKiB = anonBefore, anonAfter
	res.AnonKiBPerConn = float64(anonAfter-anonBefore) / float64(n)
	res.SettleSecs = settle.Seconds()
	res.RSSBeforeKiB, res.RSSAfterKiB = before, after
	res.OpenAtEnd = res.Handshaken - int(closed.Load())
	res.BytesPerConn = float64(after-before) * 1024 / float64(n)
	res.KiBPerConn = res.BytesPerConn / 1024
	if res.Handshaken < n || res.OpenAtEnd < n {
		return &res, fmt.Errorf("%d of %d connections handshaken, %d open at the end (first error: %v)", res.Handshaken, n, res.OpenAtEnd, firstErr)
	}
	return &res, nil
}

// handshake dials target (and, with tlsCfg, completes a TLS handshake
// that must negotiate h2) and completes the HTTP/2 handshake (RFC 9113
// §3.4): the client preface and an empty SETTINGS out, the server's
// SETTINGS in and acknowledged, and our SETTINGS acknowledged; then, with
// call set, it makes that gRPC call on stream 1 and reads its answer to
// the trailers, which must say grpc-status 0. Frames the server sends
// meanwhile (WINDOW_UPDATE, PING) are read past; a PING is answered.
func handshake(ctx context.Context, target, call string, tlsCfg *tls.Config) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", target)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	scheme := "http"
	if tlsCfg != nil {
		tc := tls.Client(c, tlsCfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			c.Close()
			return nil, fmt.Errorf("TLS handshake with %s: %w", target, err)
		}
		if p := tc.ConnectionState().NegotiatedProtocol; p != http2.NextProtoTLS {
			tc.Close()
			return nil, fmt.Errorf("TLS handshake with %s: ALPN %q, want %q", target, p, http2.NextProtoTLS)
		}
		c, scheme = tc, "https"
	}
	if err := converse(c, target, scheme, call); err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// converse is handshake's exchange on the connection c.
func converse(c net.Conn, target, scheme, call string) error {
	bw := bufio.NewWriter(c)
	fr := http2.NewFramer(bw, c)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if _, err := io.WriteString(bw, http2.ClientPreface); err != nil {
		return err
	}
	if err := fr.WriteSettings(); err != nil {
		return err
	}
	if call != "" {
		var block bytes.Buffer
		enc := hpack.NewEncoder(&block)
		for _, f := range [][2]string{{":method", "POST"}, {":scheme", scheme}, {":path", call}, {":authority", target},
			{"content-type", "application/grpc"}, {"te", "trailers"}} {
			enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block.Bytes(), EndHeaders: true}); err != nil {
			return err
		}
		// An empty message: no compression flag, length 0.
		if err := fr.WriteData(1, true, make([]byte, 5)); err != nil {
			return err
		}
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	gotSettings, gotAck, answered := false, false, call == ""
	for !gotSettings || !gotAck || !answered {
		f, err := fr.ReadFrame()
		if err != nil {
			return fmt.Errorf("handshake with %s: %w", target, err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if f.IsAck() {
				gotAck = true
				continue
			}
			gotSettings = true
			if err := fr.WriteSettingsAck(); err != nil {
				return err
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				if err := fr.WritePing(true, f.Data); err != nil {
					return err
				}
			}
		case *http2.MetaHeadersFrame:
			if f.StreamEnded() {
				if st := f.PseudoValue("status"); st != "" && st != "200" {
					return fmt.Errorf("call %s: HTTP status %s", call, st)
				}
				if gs := grpcStatus(f.Fields); gs != "0" {
					return fmt.Errorf("call %s: grpc-status %q", call, gs)
				}
				answered = true
			}
		case *http2.RSTStreamFrame:
			return fmt.Errorf("call %s: RST_STREAM %v", call, f.ErrCode)
		case *http2.GoAwayFrame:
			return fmt.Errorf("handshake with %s: GOAWAY %v", target, f.ErrCode)
		}
		if err := bw.Flush(); err != nil {
			return err
		}
	}
	return nil
}

// grpcStatus is the grpc-status among fields, or "".
func grpcStatus(fields []hpack.HeaderField) string {
	for _, f := range fields {
		if f.Name == "grpc-status" {
			return f.Value
		}
	}
	return ""
}

// rssKiB sums a /proc/PID/status field (VmRSS:, RssAnon:) of the
// processes.
func rssKiB(pids []int, field string) (int64, error) {
	var total int64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			return 0, err
		}
		found := false
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, field); ok {
				k, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
				if err != nil {
					return 0, fmt.Errorf("pid %d: %s %q: %w", pid, field, v, err)
				}
				total += k
				found = true
			}
		}
		if !found {
			return 0, fmt.Errorf("pid %d: no %s", pid, field)
		}
	}
	return total, nil
}

// raiseNoFile raises this process's open-file limit to at least want.
func raiseNoFile(want uint64) error {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return err
	}
	if l.Cur >= want {
		return nil
	}
	l.Cur = want
	if l.Max < want {
		l.Max = want
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return fmt.Errorf("raising RLIMIT_NOFILE to %d (run as root, or ulimit -n): %w", want, err)
	}
	return nil
}
