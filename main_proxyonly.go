//go:build proxyonly

package main

import (
	"fmt"

	"github.com/urfave/cli/v2"
)

// buildTag is the build tag that makes the production binary: the proxy,
// validate and version commands only. The development commands (testserver,
// demo, loadtest) would link in the embedded etcd server, ghz with dynamic
// protobuf and the gRPC interop service, whose code the proxy never runs
// but whose package initialisation and file-backed pages it would carry.
const buildTag = "proxyonly"

// The development commands stay on the command line, so calling one says
// why it is missing instead of "unknown command".
func testserverCommand() *cli.Command { return leftOut("testserver") }
func demoCommand() *cli.Command       { return leftOut("demo") }
func loadtestCommand() *cli.Command   { return leftOut("loadtest") }

// leftOut is a command that this build does not carry: it accepts any
// arguments and fails with exit code 2.
func leftOut(name string) *cli.Command {
	return &cli.Command{
		Name:            name,
		Usage:           fmt.Sprintf("not in this build (built with -tags %s); build without it for %s", buildTag, name),
		SkipFlagParsing: true,
		HideHelp:        true,
		Action: func(*cli.Context) error {
			return usageErr("the %s command is not in this build: it was built with -tags %s, the proxy-only production build; "+
				"build without the tag (go build .) for the development commands testserver, demo and loadtest", name, buildTag)
		},
	}
}
