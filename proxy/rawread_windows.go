package proxy

import "syscall"

// rawRead is read(2); see rawsys_linux.go.
func rawRead(fd uintptr, p []byte) (int, error) { return syscall.Read(syscall.Handle(fd), p) }
