//go:build !linux

package proxy

import (
	"net"
	"sync/atomic"
)

// rawSock is Linux-only (rawsys_linux.go); elsewhere the writer writes nc.
type rawSock struct {
	net.Conn
	progress *atomic.Uint32
}

func newRawSock(net.Conn) *rawSock { return nil }

// writeSegs is never called: newRawSock makes no rawSock here.
func (s *rawSock) writeSegs(segs [][]byte, more bool) error {
	for _, p := range segs {
		if _, err := s.Write(p); err != nil {
			return err
		}
	}
	return nil
}

// WrapSocket returns nc: the raw-syscall socket is Linux-only.
func WrapSocket(nc net.Conn) net.Conn { return nc }

// push is never called: newRawSock makes no rawSock here.
func (s *rawSock) push() {}
