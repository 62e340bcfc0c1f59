// Package fileread reads the files a running proxy reads again and again
// (its configuration file, the TLS files of clients, backends and
// registries), refusing what would block or exhaust it.
package fileread

import (
	"fmt"
	"io"
	"os"
	"syscall"
)

// MaxSize bounds a configuration file, and the TLS files it names: a
// larger one is refused rather than read. A file of thousands of clusters
// and routes is well under a megabyte.
const MaxSize = 16 << 20

// Regular reads the configuration file (or TLS file) at path, which must
// be a regular file (or a symlink to one) of at most MaxSize bytes. It
// never blocks on the path: a FIFO, a device such as /dev/zero or a
// directory put there by mistake is refused with an error that says so,
// where os.ReadFile waited for a FIFO's writer forever (the reload loop,
// and with it shutdown, stuck) or read /dev/zero until memory ran out.
func Regular(path string) ([]byte, error) {
	// O_NONBLOCK: opening a FIFO without a writer returns at once; for a
	// regular file it changes nothing.
	fd, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer fd.Close()
	st, err := fd.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file but %s", path, fileKind(st.Mode()))
	}
	if st.Size() > MaxSize {
		return nil, fmt.Errorf("%s: %d bytes, over the %d bytes the proxy reads of a file", path, st.Size(), MaxSize)
	}
	data, err := io.ReadAll(io.LimitReader(fd, MaxSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > MaxSize {
		return nil, fmt.Errorf("%s: grew over %d bytes while it was read", path, MaxSize)
	}
	return data, nil
}

// fileKind names the type of a file that is not a regular one.
func fileKind(m os.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m&os.ModeNamedPipe != 0:
		return "a named pipe (FIFO)"
	case m&os.ModeSocket != 0:
		return "a socket"
	case m&os.ModeDevice != 0:
		return "a device"
	}
	return "a file of type " + m.Type().String()
}
