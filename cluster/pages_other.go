//go:build !linux

package cluster

// ReleaseStartupPages does nothing outside Linux: it returns 0 and no
// error. See pages_linux.go.
func ReleaseStartupPages() (int64, error) { return 0, nil }
