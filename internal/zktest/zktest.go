// Package zktest runs a real ZooKeeper server (Debian's zookeeper package,
// a Java process) on a free loopback port for tests. It is imported only by
// tests and imports nothing of streamlb's but internal/testkit. When
// ZooKeeper is not installed the test is skipped, unless
// STREAMLB_REQUIRE_ZOOKEEPER=1, which fails it.
package zktest

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/testkit"
)

// Jar is the ZooKeeper server of Debian's libzookeeper-java package (which
// the zookeeper package depends on); its manifest names its libraries.
const Jar = "/usr/share/java/zookeeper.jar"

// TickTime is the server's tick: sessions may last 2 to 20 ticks, so 0.4 s
// to 4 s here, which keeps expiry tests short.
const TickTime = 200 * time.Millisecond

// Server is one standalone ZooKeeper server. Its port and data directory
// stay the same across Stop and Start, so a restarted server has the same
// data, as after an outage.
type Server struct {
	t          testing.TB
	dir        string
	addr       string
	secureAddr string // "" without TLS
	cfg        string

	mu     sync.Mutex // guards the fields below
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has exited
	log    *bytes.Buffer
}

// Start starts ZooKeeper with its data in t.TempDir() and stops it when
// the test ends. It skips t if java or the jar is missing, unless
// STREAMLB_REQUIRE_ZOOKEEPER=1.
func Start(t testing.TB) *Server {
	t.Helper()
	return StartWith(t, Options{})
}

// Options configures [StartWith]. The zero value is a cleartext server,
// as [Start] runs.
type Options struct {
	// Keystore is a PEM file holding the server's certificate and its
	// PKCS#8 private key; it turns on a TLS port (secureClientPort, with
	// the Netty connection factory) beside the cleartext one.
	Keystore string
	// Truststore is a PEM file of the CAs client certificates must chain
	// to, and ClientAuth is ZooKeeper's ssl.clientAuth: "need", "want" or
	// "none" (the default when empty).
	Truststore, ClientAuth string
}

// NettyCodecJar holds Netty's codec classes, which the TLS port needs and
// the jar's manifest does not list (Debian's libnetty-java, a dependency
// of libzookeeper-java).
const NettyCodecJar = "/usr/share/java/netty-codec.jar"

// StartWith is [Start] with TLS settings.
func StartWith(t testing.TB, opts Options) *Server {
	t.Helper()
	_, jerr := exec.LookPath("java")
	_, ferr := os.Stat(Jar)
	if jerr != nil || ferr != nil {
		if os.Getenv("STREAMLB_REQUIRE_ZOOKEEPER") == "1" {
			t.Fatalf("zookeeper not found but STREAMLB_REQUIRE_ZOOKEEPER=1: java: %v, jar: %v", jerr, ferr)
		}
		t.Skipf("zookeeper not installed (java: %v, jar: %v); apt-get install zookeeper (or default-jre-headless libzookeeper-java), or set STREAMLB_REQUIRE_ZOOKEEPER=1 to require it", jerr, ferr)
	}
	s := &Server{t: t, dir: t.TempDir()}
	s.addr = testkit.FreeAddr(t)
	_, port, _ := net.SplitHostPort(s.addr)
	var secure string
	if opts.Keystore != "" {
		if _, err := os.Stat(NettyCodecJar); err != nil {
			t.Fatalf("zookeeper TLS needs Netty's codec: %v (apt-get install libnetty-java)", err)
		}
		s.secureAddr = testkit.FreeAddr(t)
		_, sport, _ := net.SplitHostPort(s.secureAddr)
		clientAuth := opts.ClientAuth
		if clientAuth == "" {
			clientAuth = "none"
		}
		secure = fmt.Sprintf(`secureClientPort=%s
secureClientPortAddress=127.0.0.1
serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory
ssl.keyStore.location=%s
ssl.keyStore.type=PEM
ssl.clientAuth=%s
`, sport, opts.Keystore, clientAuth)
		if opts.Truststore != "" {
			secure += fmt.Sprintf("ssl.trustStore.location=%s\nssl.trustStore.type=PEM\n", opts.Truststore)
		}
	}
	s.cfg = filepath.Join(s.dir, "zoo.cfg")
	cfg := fmt.Sprintf(`tickTime=%d
dataDir=%s
clientPort=%s
clientPortAddress=127.0.0.1
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=srvr
`, TickTime.Milliseconds(), filepath.Join(s.dir, "data"), port) + secure
	if err := os.WriteFile(s.cfg, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

// Addr returns the client address, "127.0.0.1:PORT".
func (s *Server) Addr() string { return s.addr }

// SecureAddr returns the TLS client address, "127.0.0.1:PORT", or "" if
// the server has no Keystore.
func (s *Server) SecureAddr() string { return s.secureAddr }

// Start (re)starts the server if it is stopped and waits until it serves
// clients, for at most 60 s (a JVM on a busy machine starts slowly).
func (s *Server) Start() {
	s.t.Helper()
	s.mu.Lock()
	if s.cmd != nil {
		s.mu.Unlock()
		return
	}
	s.log = &bytes.Buffer{}
	// ZooKeeperServerMain is the standalone server zkServer.sh runs.
	cmd := exec.Command("java", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
		"-Dzookeeper.log.dir="+s.dir, "-Dzookeeper.root.logger=WARN,CONSOLE",
		"-cp", Jar+":"+NettyCodecJar,
		"org.apache.zookeeper.server.ZooKeeperServerMain", s.cfg)
	cmd.Stdout, cmd.Stderr = &lockedWriter{mu: &s.mu, w: s.log}, &lockedWriter{mu: &s.mu, w: s.log}
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		s.mu.Unlock()
		s.t.Fatalf("start zookeeper: %v", err)
	}
	s.cmd = cmd
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	s.exited = exited
	s.mu.Unlock()

	deadline := time.Now().Add(60 * time.Second)
	for !serving(s.addr) {
		select {
		case <-exited:
			s.t.Fatalf("zookeeper exited at start:\n%s", s.Log())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Stop()
			s.t.Fatalf("zookeeper did not answer within 60s:\n%s", s.Log())
		}
	}
}

// Stop kills the server, as a crash would, and waits for it to exit. It
// does nothing if the server is stopped.
func (s *Server) Stop() {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-exited
}

// Log returns what the server wrote so far.
func (s *Server) Log() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.log == nil {
		return ""
	}
	return s.log.String()
}

// serving reports whether a ZooKeeper serves clients at addr. ("ruok"
// answers imok before the server takes sessions; "srvr" says whether it
// serves requests.)
func serving(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("srvr")); err != nil {
		return false
	}
	out, _ := io.ReadAll(c)
	return strings.Contains(string(out), "Mode: standalone")
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
