//go:build !unix

package testkit

import "testing"

// RefusingAddr returns a loopback address that refuses connections. Here
// it is DeadAddr's: a port that was free a moment ago, which another
// process could take meanwhile; the unix version keeps the port bound.
func RefusingAddr(t testing.TB) string {
	t.Helper()
	return DeadAddr(t)
}
