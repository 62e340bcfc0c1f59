package main

import (
	"fmt"
	"runtime/debug"
	"strings"

	"github.com/urfave/cli/v2"
)

// revision is the VCS revision, set with -ldflags "-X main.revision=REV"
// where the build has no repository to read it from (the Dockerfile, whose
// context leaves .git out).
var revision string

// buildVersion describes the binary from its build info: the module
// version, and the VCS revision, its time and whether the tree was
// modified, which `go build` stamps when it runs inside the repository
// with -buildvcs=true (this machine's GOFLAGS sets -buildvcs=false, and
// `go run` never stamps). read is debug.ReadBuildInfo, injected for tests.
func buildVersion(read func() (*debug.BuildInfo, bool)) string {
	bi, ok := read()
	if !ok {
		return "unknown (no build info)"
	}
	var b strings.Builder
	b.WriteString(bi.Main.Version)
	if bi.Main.Version == "" {
		b.WriteString("(devel)")
	}
	settings := make(map[string]string)
	for _, s := range bi.Settings {
		settings[s.Key] = s.Value
	}
	if settings["vcs.revision"] == "" && revision != "" {
		settings["vcs.revision"] = revision
	}
	if rev := settings["vcs.revision"]; rev != "" {
		fmt.Fprintf(&b, " revision %s", rev)
		if t := settings["vcs.time"]; t != "" {
			fmt.Fprintf(&b, " (%s", t)
			if settings["vcs.modified"] == "true" {
				b.WriteString(", modified")
			}
			b.WriteString(")")
		}
	} else {
		b.WriteString(" (no VCS revision stamped: build with go build -buildvcs=true)")
	}
	fmt.Fprintf(&b, " %s", bi.GoVersion)
	return b.String()
}

// versionCommand is `streamlb version`; `streamlb --version` prints the
// same line.
func versionCommand() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print the version and VCS revision this binary was built from",
		Action: func(c *cli.Context) error {
			fmt.Fprintf(c.App.Writer, "streamlb %s\n", buildVersion(debug.ReadBuildInfo))
			return nil
		},
	}
}
