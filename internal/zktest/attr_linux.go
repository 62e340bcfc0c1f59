package zktest

import "syscall"

// childAttr makes the ZooKeeper process die with the test binary, even
// when the binary is killed before its cleanup runs.
func childAttr() *syscall.SysProcAttr { return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} }
