//go:build !linux

package proxy

import (
	"net"
	"syscall"
	"time"
)

// parkSupported: only Linux parks idle client connections (park.go);
// elsewhere every connection keeps its reader goroutine.
const parkSupported = false

func socketRawConn(net.Conn) syscall.RawConn { return nil }

// parker is the stand-in for Linux's epoll parker: parkRawConn gives no
// connection a socket to park, so none of its methods is reached but
// init and stop.
type parker struct{}

func (p *parker) init(*Server)           {}
func (p *parker) park(*serverConn) error { return errNoParking }
func (p *parker) forget(*serverConn)     {}
func (p *parker) closing(*serverConn)    {}
func (p *parker) stop()                  {}

func (p *parker) parked() int          { return 0 }
func (p *parker) gcDue(time.Time) bool { return false }
