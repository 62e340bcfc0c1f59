package cluster

import (
	"fmt"
	"io"
	"os"
	"syscall"
)

// MaxFileSize bounds a configuration file, and the TLS files it names: a
// larger one is refused rather than read. A file of thousands of clusters
// and routes is well under a megabyte.
const MaxFileSize = 16 << 20

// readConfig reads the configuration file (or TLS file) at path, which must be a
// regular file (or a symlink to one) of at most MaxFileSize bytes. It
// never blocks on the path: a FIFO, a device such as /dev/zero or a
// directory put there by mistake is refused with an error that says so,
// where os.ReadFile waited for a FIFO's writer forever (the reload loop,
// and with it shutdown, stuck) or read /dev/zero until memory ran out.
func readRegularFile(path string) ([]byte, error) {
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
	if st.Size() > MaxFileSize {
		return nil, fmt.Errorf("%s: %d bytes, over the %d bytes the proxy reads of a file", path, st.Size(), MaxFileSize)
	}
	data, err := io.ReadAll(io.LimitReader(fd, MaxFileSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("%s: grew over %d bytes while it was read", path, MaxFileSize)
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
