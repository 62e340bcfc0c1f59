//go:build unix

package testkit

import (
	"fmt"
	"syscall"
	"testing"
)

// RefusingAddr returns a loopback address that refuses connections until
// the test ends. Unlike DeadAddr's, its port stays taken: a socket is
// bound to it and never listens, so a connection to it is refused and no
// other process (the tests of another package, run in parallel) can start
// a server on it meanwhile.
func RefusingAddr(t testing.TB) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	syscall.CloseOnExec(fd) // SOCK_CLOEXEC is not on every unix
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
}
