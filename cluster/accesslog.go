package cluster

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/streamlb/streamlb/proxy"
)

// AccessLog writes one line per call, with stable lower_snake keys:
// method, cluster, backend, code, duration, bytes_in, bytes_out, retries,
// client, and, when they apply, message (grpc-message of a failed call),
// proxy_status (the proxy made the status) and limit (the limit that
// refused the call). It gets calls from the data plane's call-end hook,
// which runs off the relay's goroutines and under no lock. Safe for
// concurrent use.
type AccessLog struct {
	log    *slog.Logger
	closer io.Closer // nil when the log does not own its writer
}

// NewAccessLog returns an access log writing records to h, at level Info.
func NewAccessLog(h slog.Handler) *AccessLog {
	return &AccessLog{log: slog.New(h)}
}

// OpenAccessLog opens the access log the proxy command's --access-log
// names: "-" or "stderr" for stderr, anything else a file opened for
// appending (created if missing). format is "text" or "json", as for
// --log-format. Close closes the file.
func OpenAccessLog(path, format string, stderr io.Writer) (*AccessLog, error) {
	var w io.Writer = stderr
	var closer io.Closer
	if path != "-" && path != "stderr" {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("cluster: access log: %w", err)
		}
		w, closer = f, f
	}
	var h slog.Handler
	switch strings.ToLower(format) {
	case "", "text":
		h = slog.NewTextHandler(w, nil)
	case "json":
		h = slog.NewJSONHandler(w, nil)
	default:
		if closer != nil {
			closer.Close()
		}
		return nil, fmt.Errorf("cluster: access log: unknown format %q (want text or json)", format)
	}
	al := NewAccessLog(h)
	al.closer = closer
	return al, nil
}

// Close closes the file OpenAccessLog opened, if any. Call it after the
// server's Run returned: no line is written after that.
func (a *AccessLog) Close() error {
	if a == nil || a.closer == nil {
		return nil
	}
	return a.closer.Close()
}

// callEnd writes ci's line.
func (a *AccessLog) callEnd(cluster string, ci proxy.CallInfo) {
	retries := 0
	if ci.Attempts > 1 {
		retries = ci.Attempts - 1
	}
	client := ""
	if ci.Client != nil {
		client = ci.Client.String()
	}
	attrs := make([]slog.Attr, 0, 12)
	attrs = append(attrs,
		slog.String("method", ci.Method),
		slog.String("cluster", cluster),
		slog.String("backend", ci.Backend),
		slog.String("code", ci.Code.String()),
		slog.Duration("duration", ci.Duration),
		slog.Int64("bytes_in", ci.RequestBytes),
		slog.Int64("bytes_out", ci.ResponseBytes),
		slog.Int("retries", retries),
		slog.String("client", client),
	)
	if ci.Message != "" {
		attrs = append(attrs, slog.String("message", ci.Message))
	}
	if ci.ProxyStatus {
		attrs = append(attrs, slog.Bool("proxy_status", true))
	}
	if ci.Limit != "" {
		attrs = append(attrs, slog.String("limit", ci.Limit))
	}
	a.log.LogAttrs(context.Background(), slog.LevelInfo, "call", attrs...)
}
