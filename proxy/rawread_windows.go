package proxy

import "syscall"

// rawRead is never called on Windows: plainSocket returns no RawConn
// there, so connections are read through net.Conn.Read. It keeps
// connReader's raw path building.
func rawRead(fd uintptr, p []byte) (int, error) { return syscall.Read(syscall.Handle(fd), p) }

// rawReadv reads into a only: readv(2) is rawsys_linux.go's; b is for a
// fill that goes on into the next buffer, which a fill here leaves empty.
func rawReadv(fd uintptr, a, _ []byte) (int, error) { return rawRead(fd, a) }
