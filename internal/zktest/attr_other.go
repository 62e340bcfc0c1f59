//go:build !linux

package zktest

import "syscall"

// childAttr: Pdeathsig is Linux-only; elsewhere the test's cleanup stops
// the server.
func childAttr() *syscall.SysProcAttr { return nil }
