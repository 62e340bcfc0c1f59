package resolver

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// dnsmasq is a real DNS server run as a child process, answering from a
// hosts file the test rewrites.
type dnsmasq struct {
	addr  string
	hosts string // path of the --addn-hosts file
	cmd   *exec.Cmd
	logs  *syncBuffer
}

// startDnsmasq runs dnsmasq on a free loopback port with extra flags,
// answering from hosts (lines of /etc/hosts syntax). It skips the test when
// dnsmasq is not installed, unless STREAMLB_REQUIRE_DNSMASQ=1.
func startDnsmasq(t *testing.T, hosts string, extra ...string) *dnsmasq {
	t.Helper()
	bin, err := exec.LookPath("dnsmasq")
	if err != nil {
		if os.Getenv("STREAMLB_REQUIRE_DNSMASQ") == "1" {
			t.Fatalf("dnsmasq not found but STREAMLB_REQUIRE_DNSMASQ=1: %v", err)
		}
		t.Skipf("dnsmasq not installed (%v); apt-get install dnsmasq, or set STREAMLB_REQUIRE_DNSMASQ=1 to require it", err)
	}
	dir := t.TempDir()
	d := &dnsmasq{hosts: filepath.Join(dir, "hosts")}
	d.write(t, hosts)
	var lastErr error
	for range 5 { // the free port may be taken before dnsmasq binds it
		port := freeUDPPort(t)
		args := []string{
			"--keep-in-foreground",
			"--conf-file=/dev/null", // ignore /etc/dnsmasq.conf and its conf-dir
			"--no-resolv",
			"--no-hosts",
			"--listen-address=127.0.0.1",
			"--bind-interfaces",
			"--port=" + strconv.Itoa(port),
			"--addn-hosts=" + d.hosts,
			"--local-ttl=1",
			"--pid-file=",
			"--log-facility=-",
		}
		if os.Getuid() == 0 {
			// dnsmasq drops root to "dnsmasq"/"nobody" by default, which
			// could not read the test's private hosts file on SIGHUP.
			args = append(args, "--user=root", "--group=root")
		}
		args = append(args, extra...)
		d.logs = &syncBuffer{}
		d.cmd = exec.Command(bin, args...)
		d.cmd.Stdout, d.cmd.Stderr = d.logs, d.logs
		if err := d.cmd.Start(); err != nil {
			t.Fatalf("start dnsmasq: %v", err)
		}
		exited := make(chan error, 1)
		go func() { exited <- d.cmd.Wait() }()
		d.addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if err := d.waitReady(exited); err != nil {
			lastErr = err
			continue
		}
		t.Cleanup(func() {
			d.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				d.cmd.Process.Kill()
				<-exited
			}
			if t.Failed() {
				t.Logf("dnsmasq logs:\n%s", d.logs)
			}
		})
		return d
	}
	t.Fatalf("dnsmasq did not start: %v", lastErr)
	return nil
}

// waitReady polls dnsmasq with queries until it answers, it exits, or 10s
// pass. On failure the process is gone.
func (d *dnsmasq) waitReady(exited <-chan error) error {
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		m := new(dns.Msg)
		m.SetQuestion("ready.invalid.", dns.TypeA)
		c := &dns.Client{Timeout: 100 * time.Millisecond}
		if _, _, err := c.Exchange(m, d.addr); err == nil {
			return nil
		}
		select {
		case err := <-exited:
			return errors.Join(errors.New("dnsmasq exited: "+strings.TrimSpace(d.logs.String())), err)
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			d.cmd.Process.Kill()
			<-exited
			return errors.New("dnsmasq never answered")
		}
	}
}

// write replaces the hosts file atomically.
func (d *dnsmasq) write(t *testing.T, hosts string) {
	t.Helper()
	tmp := d.hosts + ".tmp"
	if err := os.WriteFile(tmp, []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, d.hosts); err != nil {
		t.Fatal(err)
	}
}

// reload rewrites the hosts file and sends SIGHUP, on which dnsmasq
// clears its cache and re-reads --addn-hosts files.
func (d *dnsmasq) reload(t *testing.T, hosts string) {
	t.Helper()
	d.write(t, hosts)
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
}

// freeUDPPort returns a UDP port that was free on 127.0.0.1 a moment ago.
func freeUDPPort(t *testing.T) int {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	return pc.LocalAddr().(*net.UDPAddr).Port
}

func TestDnsmasq(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// extra dnsmasq flags
		extra []string
		// whether dnsmasq answers authoritatively for the names, so a
		// removed name is NXDOMAIN; otherwise it REFUSES names it does not
		// know and AAAA of A-only names, which must not count as failure
		// while A has addresses
		authoritative bool
	}{
		{name: "local zone", extra: []string{"--local=/test/"}, authoritative: true},
		{name: "no upstream", authoritative: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := startDnsmasq(t, "10.0.0.1 web.test\n10.0.0.2 web.test\n", tc.extra...)
			_, u, logs := startWireDNS(t, "dns://"+d.addr+"/web.test:50051", DNSOptions{
				Refresh:        fastRefresh,
				QueryTimeout:   500 * time.Millisecond,
				BackoffInitial: 50 * time.Millisecond,
				BackoffMax:     200 * time.Millisecond,
			})
			ctx := testContext(t)
			u.waitSet(ctx, t, "10.0.0.1:50051", "10.0.0.2:50051")

			d.reload(t, "10.0.0.2 web.test\n10.0.0.3 web.test\nfd00::4 web.test\n")
			u.waitSet(ctx, t, "10.0.0.2:50051", "10.0.0.3:50051", "[fd00::4]:50051")

			d.reload(t, "10.0.0.5 web.test\n")
			u.waitSet(ctx, t, "10.0.0.5:50051")

			d.reload(t, "10.0.0.9 other.test\n")
			if tc.authoritative {
				// NXDOMAIN: the service is gone.
				u.waitSet(ctx, t)
				waitLog(ctx, t, logs, "backends=0")
			} else {
				// REFUSED: a failure, so the set stays.
				u.waitFor(ctx, t, "a reported error", func() bool { _, errs := u.snapshot(); return len(errs) > 0 })
				waitLog(ctx, t, logs, "resolution failed; keeping last set")
				if got, _ := u.last(); len(got) != 1 || got[0] != "10.0.0.5:50051" {
					t.Errorf("set after REFUSED = %v, want it kept", got)
				}
			}
			d.reload(t, "10.0.0.6 web.test\n")
			u.waitSet(ctx, t, "10.0.0.6:50051")
		})
	}
}
