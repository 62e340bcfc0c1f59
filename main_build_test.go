//go:build !proxyonly

package main

import (
	"bytes"
	"errors"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// devOnlyPackages are import paths (prefixes) that only the development
// commands need; the proxy-only build must not link any of them.
var devOnlyPackages = []string{
	"github.com/streamlb/streamlb/demo",
	"github.com/streamlb/streamlb/testserver",
	"github.com/streamlb/streamlb/loadtest",
	"github.com/streamlb/streamlb/internal/", // test kits, but for prodInternal
	"go.etcd.io/etcd/server/",                // the embedded etcd server of the demo
	"github.com/bojand/ghz/",                 // loadtest's load generator
	"github.com/jhump/protoreflect",          // ghz's dynamic messages
	"google.golang.org/grpc/interop",         // testserver's TestService
}

// prodInternal are the packages under internal/ that the proxy itself
// uses; the rest of internal/ are test kits.
var prodInternal = []string{
	"github.com/streamlb/streamlb/internal/fileread",
	"github.com/streamlb/streamlb/internal/zkhosts", // the resolver's ZooKeeper host provider
}

// productionTags are the build tags of the production binary, as the
// Dockerfile and loadtest/bench/run.sh build it: proxyonly (ours), and two
// that drop code the proxy never runs but whose package initialisation
// allocates and stays live: grpcnotrace (grpc-go without golang.org/x/net/trace
// and its html/template pages; the proxy never calls grpc.EnableTracing)
// and urfave_cli_no_docs (urfave/cli without its man-page and Markdown
// generator, go-md2man and blackfriday).
const productionTags = "proxyonly,grpcnotrace,urfave_cli_no_docs"

// prodExcluded are import paths (prefixes) the production tags leave out
// beyond devOnlyPackages: the two library tags' packages.
var prodExcluded = []string{
	"golang.org/x/net/trace",
	"html/template",
	"github.com/russross/blackfriday/",
	"github.com/cpuguy83/go-md2man/",
}

// TestProxyOnlyDeps checks that a build with -tags proxyonly leaves out the
// development commands' dependencies, and that the default build keeps them
// (so the test would notice the tag stop doing anything).
func TestProxyOnlyDeps(t *testing.T) {
	goTool := goBinary(t)
	list := func(tags ...string) []string {
		args := append([]string{"list", "-deps"}, tags...)
		out, err := exec.Command(goTool, append(args, ".")...).Output()
		if err != nil {
			t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, stderrOf(err))
		}
		return strings.Fields(string(out))
	}
	find := func(pkgs []string, prefix string) string {
		for _, p := range pkgs {
			if slices.Contains(prodInternal, p) {
				continue
			}
			if p == strings.TrimSuffix(prefix, "/") || strings.HasPrefix(p, prefix) {
				return p
			}
		}
		return ""
	}
	prod := list("-tags", productionTags)
	only := list("-tags", "proxyonly")
	full := list()
	if find(prod, "github.com/streamlb/streamlb/cluster") == "" {
		t.Fatalf("go list -deps -tags proxyonly . has no cluster package: %d packages listed", len(prod))
	}
	for _, p := range devOnlyPackages {
		if got := find(prod, p); got != "" {
			t.Errorf("the production build links %s", got)
		}
		if got := find(only, p); got != "" {
			t.Errorf("the proxy-only build (-tags proxyonly alone) links %s", got)
		}
	}
	for _, p := range prodExcluded {
		if got := find(prod, p); got != "" {
			t.Errorf("the production build (-tags %s) links %s", productionTags, got)
		}
		// Without the library tags it is linked: the tags still do
		// something.
		if find(only, p) == "" {
			t.Errorf("-tags proxyonly alone does not link %s: drop it from prodExcluded, or the tag that removed it from productionTags", p)
		}
	}
	for _, p := range []string{"github.com/streamlb/streamlb/demo", "go.etcd.io/etcd/server/", "github.com/bojand/ghz/"} {
		if find(full, p) == "" {
			t.Errorf("the default build does not link %s: the development commands lost it", p)
		}
	}
	if len(prod) >= len(full) {
		t.Errorf("proxy-only build lists %d packages, the default build %d", len(prod), len(full))
	}
}

// TestProxyOnlyBinary builds the production binary and checks that its proxy
// command has the same flags as the default build's, and that a development
// command fails with a clear error and exit code 2.
func TestProxyOnlyBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a binary")
	}
	goTool := goBinary(t)
	bin := filepath.Join(t.TempDir(), "streamlb")
	if out, err := exec.Command(goTool, "build", "-tags", productionTags, "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build -tags %s: %v\n%s", productionTags, err, out)
	}

	var want bytes.Buffer
	app := newApp()
	app.Writer = &want
	if err := app.Run([]string{"streamlb", "proxy", "--help"}); err != nil {
		t.Fatalf("proxy --help in the default build: %v", err)
	}
	got, err := exec.Command(bin, "proxy", "--help").Output()
	if err != nil {
		t.Fatalf("proxy --help in the proxy-only build: %v\n%s", err, stderrOf(err))
	}
	if string(got) != want.String() {
		t.Errorf("proxy --help differs between the builds:\nproxy-only:\n%s\ndefault:\n%s", got, want.String())
	}

	for _, cmd := range []string{"demo", "testserver", "loadtest"} {
		c := exec.Command(bin, cmd, "--name", "x")
		var stderr bytes.Buffer
		c.Stderr = &stderr
		err := c.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != exitUsage {
			t.Errorf("%s in the proxy-only build: got %v, want exit code %d", cmd, err, exitUsage)
		}
		if msg := stderr.String(); !strings.Contains(msg, "the "+cmd+" command is not in this build") || !strings.Contains(msg, "-tags proxyonly") {
			t.Errorf("%s in the proxy-only build: stderr %q does not say why", cmd, msg)
		}
	}
}

// goBinary is the go command that runs this test.
func goBinary(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no go command: %v", err)
	}
	return p
}

func stderrOf(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(ee.Stderr)
	}
	return ""
}
