package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

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
	log  *slog.Logger
	file *logFile // nil when the log does not own its writer

	mu sync.Mutex
	// mu guards the fields below: the lines whose write failed, reported
	// to the process log at most every accessLogErrorEvery.
	lost, lostTotal int64
	lostLogged      time.Time
}

// accessLogErrorEvery is how often at most a failing access log is
// reported to the process log.
const accessLogErrorEvery = 10 * time.Second

// NewAccessLog returns an access log writing records to h, at level Info.
func NewAccessLog(h slog.Handler) *AccessLog {
	return &AccessLog{log: slog.New(h)}
}

// OpenAccessLog opens the access log the proxy command's --access-log
// names: "-" or "stderr" for stderr, anything else a file opened for
// appending (created if missing), which [AccessLog.Reopen] opens again.
// format is "text" or "json", as for --log-format. Close closes the file.
func OpenAccessLog(path, format string, stderr io.Writer) (*AccessLog, error) {
	var w io.Writer = stderr
	var file *logFile
	if path != "-" && path != "stderr" {
		f, err := openLogFile(path)
		if err != nil {
			return nil, err
		}
		file = &logFile{path: path}
		file.f.Store(f)
		w = file
	}
	var h slog.Handler
	switch strings.ToLower(format) {
	case "", "text":
		h = slog.NewTextHandler(w, nil)
	case "json":
		h = slog.NewJSONHandler(w, nil)
	default:
		if file != nil {
			file.Close()
		}
		return nil, fmt.Errorf("cluster: access log: unknown format %q (want text or json)", format)
	}
	al := NewAccessLog(h)
	al.file = file
	return al, nil
}

// Close closes the file OpenAccessLog opened, if any. Call it after the
// server's Run returned: no line is written after that.
func (a *AccessLog) Close() error {
	if a == nil || a.file == nil {
		return nil
	}
	return a.file.Close()
}

// Path returns the file OpenAccessLog opened, or "" when the log does
// not write to a file of its own (stderr, or NewAccessLog's handler).
func (a *AccessLog) Path() string {
	if a == nil || a.file == nil {
		return ""
	}
	return a.file.path
}

// Reopen opens the access log's file again by its path, creating it if it
// is missing, and closes the one it wrote to: after logrotate renamed the
// file away, the next lines go to a new file at the path (the server does
// it on SIGHUP, ServerConfig.Hangup). Lines being written meanwhile go
// whole to one file or the other. If the path cannot be opened, the old
// file stays in use and the error is returned. Without a file of its own,
// Reopen does nothing.
func (a *AccessLog) Reopen() error {
	if a == nil || a.file == nil {
		return nil
	}
	return a.file.reopen()
}

// logFile is a file written by path that can be opened again under its
// writers (Reopen). Safe for concurrent use.
type logFile struct {
	path string

	// f is the file lines go to; nil once closed. Write loads it and
	// writes without a lock, so a write that blocks (a FIFO nobody
	// reads, a hung disk) holds up neither a reopen nor Close: Write held
	// a mutex while it wrote, so a SIGHUP (and the configuration reload
	// after it) and the shutdown's Close waited behind it for ever.
	// os.File keeps a descriptor open until the writes in progress on
	// it are done, so a line being written while a reopen closes its
	// file still goes whole to that file, as before; Close wakes a write
	// blocked on a FIFO.
	f atomic.Pointer[os.File]
	// torn is the file whose last line a failed write cut short (a full
	// disk takes the bytes that fit, then fails with ENOSPC): the next
	// line written to it first ends the cut one, so that each stays a
	// line of its own. The next line was glued to the cut one, and a log
	// collector dropped both, or the file.
	torn atomic.Pointer[os.File]
	// mu orders reopen and Close, never held while writing.
	mu sync.Mutex
}

// openLogFile opens path for appending. O_NONBLOCK makes the open of a
// FIFO nobody reads fail (ENXIO) instead of waiting for a reader: a
// SIGHUP that found one at the path blocked the reopen, and with it the
// process's exit (attack round 5). Writes are unaffected: the runtime
// polls a FIFO's descriptor either way, and a regular file ignores it.
func openLogFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NONBLOCK, 0o644)
	if err != nil {
		return nil, fmt.Errorf("cluster: access log: %w", err)
	}
	return f, nil
}

var newline = []byte{'\n'}

// Write writes p, one line, to the file in use.
func (l *logFile) Write(p []byte) (int, error) {
	written := 0
	for {
		f := l.f.Load()
		if f == nil {
			return written, os.ErrClosed
		}
		if l.torn.Load() == f {
			if _, err := f.Write(newline); err != nil {
				// Still no room: this line is lost whole.
				return written, err
			}
			l.torn.CompareAndSwap(f, nil)
		}
		n, err := f.Write(p[written:])
		if err != nil && n > 0 {
			l.torn.Store(f)
		}
		written += n
		if err != nil && errors.Is(err, os.ErrClosed) && l.f.Load() != f && l.f.Load() != nil {
			// Reopened between the load and the write: the rest of
			// the line goes to the new file.
			continue
		}
		return written, err
	}
}

// reopen opens path (outside mu, so a slow open holds up nothing), swaps
// the new file in and closes the old one.
func (l *logFile) reopen() error {
	f, err := openLogFile(l.path)
	if err != nil {
		return err
	}
	l.mu.Lock()
	old := l.f.Load()
	if old == nil { // closed meanwhile
		l.mu.Unlock()
		f.Close()
		return nil
	}
	l.f.Store(f)
	l.mu.Unlock()
	return old.Close()
}

// Close closes the file; later Writes fail with os.ErrClosed, and so
// does one blocked on a FIFO.
func (l *logFile) Close() error {
	l.mu.Lock()
	old := l.f.Swap(nil)
	l.mu.Unlock()
	if old == nil {
		return nil
	}
	return old.Close()
}

// callEnd writes ci's line; a failed write is reported to errLog (see
// failed).
func (a *AccessLog) callEnd(cluster string, ci proxy.CallInfo, errLog *slog.Logger) {
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
	// Logger.LogAttrs drops the handler's error: a full disk (ENOSPC), an
	// I/O error or a closed file lost every line without a word. Report
	// them, as nginx reports its failed access-log writes in its error
	// log.
	h := a.log.Handler()
	if !h.Enabled(context.Background(), slog.LevelInfo) {
		return
	}
	r := slog.NewRecord(time.Now(), slog.LevelInfo, "call", 0)
	r.AddAttrs(attrs...)
	if err := h.Handle(context.Background(), r); err != nil {
		a.failed(err, errLog)
	}
}

// failed counts a line whose write failed with err and reports the lines
// lost to errLog (nil: not reported) at most every accessLogErrorEvery.
func (a *AccessLog) failed(err error, errLog *slog.Logger) {
	now := time.Now()
	a.mu.Lock()
	a.lost++
	a.lostTotal++
	if errLog == nil || now.Sub(a.lostLogged) < accessLogErrorEvery {
		a.mu.Unlock()
		return
	}
	a.lostLogged = now
	lost, total := a.lost, a.lostTotal
	a.lost = 0
	a.mu.Unlock()
	errLog.Error("access log: writing lines failed; they are lost", "path", a.Path(), "err", err, "lost", lost, "lost_total", total)
}
