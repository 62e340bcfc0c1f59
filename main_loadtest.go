package main

import "github.com/urfave/cli/v2"

// loadtestCommand is `streamlb loadtest`: ghz-driven load with a
// per-backend balance report.
func loadtestCommand() *cli.Command {
	return &cli.Command{
		Name:  "loadtest",
		Usage: "drive gRPC load with ghz and report how calls spread over backends",
		Action: func(c *cli.Context) error {
			return failure(errLoadtestNotBuilt)
		},
	}
}

var errLoadtestNotBuilt = errorString("loadtest is not built yet")

type errorString string

func (e errorString) Error() string { return string(e) }
