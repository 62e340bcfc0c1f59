package main

import (
	"fmt"
	"log/slog"

	"github.com/urfave/cli/v2"

	"github.com/streamlb/streamlb/cluster"
)

func validateCommand() *cli.Command {
	return &cli.Command{
		Name:      "validate",
		Usage:     "check a configuration file without starting anything",
		UsageText: "streamlb validate --config FILE",
		Description: "Parses FILE strictly (unknown fields are errors) and checks it as\n" +
			"'streamlb proxy --config FILE' would, including the TLS files it names.\n" +
			"Exits 0 if the file is good, 2 with a message naming the line and field\n" +
			"if not.",
		OnUsageError: onUsageError,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "config", Usage: "required: YAML configuration `FILE`"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return usageErr("unexpected argument %q", c.Args().First())
			}
			path := c.String("config")
			if path == "" {
				return usageErr("no file: give --config FILE")
			}
			f, err := cluster.LoadFile(path)
			if err != nil {
				return usageErr("%v", err)
			}
			// NewServer reads the TLS files and builds everything, starting
			// nothing.
			cfg := f.ServerConfig()
			cfg.Logger = slog.New(slog.DiscardHandler)
			if _, err := cluster.NewServer(cfg); err != nil {
				return usageErr("%s: %v", path, err)
			}
			fmt.Fprintf(c.App.Writer, "%s: ok (%s, %s)\n", path, plural(len(f.Clusters), "cluster"), plural(len(f.Routes), "route"))
			return nil
		},
	}
}

// plural is "1 cluster", "2 clusters".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}
