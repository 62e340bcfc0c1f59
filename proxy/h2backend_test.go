package proxy_test

import (
	"bufio"
	"io"
	"net"
	"sync"
	"testing"

	"golang.org/x/net/http2"
)

// rawBackend listens on 127.0.0.1:0 and hands every connection to serve,
// for backends no gRPC server would be. The listener and every connection
// are closed, and serve's goroutines waited for, at cleanup.
func rawBackend(t testing.TB, serve func(nc net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, nc)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer nc.Close()
				serve(nc)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, nc := range conns {
			nc.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// h2Server is a raw HTTP/2 server's end of one connection from the proxy,
// written frame by frame, for a rawBackend's serve. Each frame its Framer
// writes goes out at once, unless buffered was called.
type h2Server struct {
	fr *http2.Framer
	nc net.Conn
	br *bufio.Reader
	w  *bufio.Writer // nil unless buffered
	// ackOnce: acknowledge only the proxy's first SETTINGS, and stay
	// silent after that, whatever the proxy sends.
	ackOnce bool
}

// acceptH2 reads the client preface the proxy opens nc with.
func acceptH2(nc net.Conn) (*h2Server, error) {
	br := bufio.NewReader(nc)
	if _, err := io.ReadFull(br, make([]byte, len(http2.ClientPreface))); err != nil {
		return nil, err
	}
	return &h2Server{fr: http2.NewFramer(nc, br), nc: nc, br: br}, nil
}

// buffered makes the Framer (a new one) write to a buffer that serve
// flushes after each frame it hands on, so that the frames written for one
// go out together; code that writes and then waits outside serve calls
// flush itself.
func (s *h2Server) buffered() {
	s.w = bufio.NewWriter(s.nc)
	s.fr = http2.NewFramer(s.w, s.br)
}

func (s *h2Server) flush() error {
	if s.w == nil {
		return nil
	}
	return s.w.Flush()
}

// hello sends the server's SETTINGS, the first frame of its preface.
func (s *h2Server) hello(settings ...http2.Setting) error {
	if err := s.fr.WriteSettings(settings...); err != nil {
		return err
	}
	return s.flush()
}

// serve reads frames, acknowledges the proxy's SETTINGS and hands every
// frame to on (nil: none), flushing what was written after each, until on
// returns false (serve returns nil) or reading or writing fails (serve
// returns that error).
func (s *h2Server) serve(on func(http2.Frame) bool) error {
	acked := false
	for {
		f, err := s.fr.ReadFrame()
		if err != nil {
			return err
		}
		if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() && !(s.ackOnce && acked) {
			acked = true
			if err := s.fr.WriteSettingsAck(); err != nil {
				return err
			}
		}
		more := on == nil || on(f)
		if err := s.flush(); err != nil {
			return err
		}
		if !more {
			return nil
		}
	}
}

// h2Backend is a raw HTTP/2 server: it reads the preface, sends SETTINGS,
// and calls onHeaders for every request HEADERS until onHeaders returns
// false or the connection ends.
func h2Backend(onHeaders func(fr *http2.Framer, id uint32) bool) func(net.Conn) {
	return h2Frames(func(s *h2Server, f http2.Frame) bool {
		h, ok := f.(*http2.HeadersFrame)
		return !ok || onHeaders(s.fr, h.StreamID)
	})
}

// h2Frames is a raw HTTP/2 server that hands every frame to on, with the
// connection's h2Server to answer on, until on returns false or the
// connection ends; it reads the preface, sends SETTINGS and acknowledges
// the proxy's.
func h2Frames(on func(s *h2Server, f http2.Frame) bool) func(net.Conn) {
	return func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		s.serve(func(f http2.Frame) bool { return on(s, f) })
	}
}

// floodBackend is a raw HTTP/2 backend that answers a request's HEADERS
// with flood, illegal frames allowed, then reads until the proxy's GOAWAY
// and sends its code on goAway (buffered, one).
func floodBackend(t testing.TB, flood func(fr *http2.Framer, id uint32), goAway chan<- http2.ErrCode) string {
	return rawBackend(t, h2Backend(func(fr *http2.Framer, id uint32) bool {
		fr.AllowIllegalWrites = true
		flood(fr, id)
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return false
			}
			if ga, ok := f.(*http2.GoAwayFrame); ok {
				goAway <- ga.ErrCode
				return false
			}
		}
	}))
}

// pingedH2 is a raw HTTP/2 server for rawBackend: it answers each
// request's HEADERS with answer, then a PING carrying ping; when the proxy
// acknowledges that PING, so it has read all that answer wrote, it calls
// then for the stream, whose false closes the connection.
func pingedH2(ping [8]byte, answer func(s *h2Server, id uint32), then func(s *h2Server, id uint32) bool) func(net.Conn) {
	return func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil || s.hello() != nil {
			return
		}
		var id uint32
		s.serve(func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.HeadersFrame:
				id = f.StreamID
				answer(s, id)
				s.fr.WritePing(false, ping)
			case *http2.PingFrame:
				if f.IsAck() && f.Data == ping {
					return then(s, id)
				}
			}
			return true
		})
	}
}

// halfMessageH2 is pingedH2 answering with gRPC response headers, k
// copies of msg and the first half of another.
func halfMessageH2(msg []byte, k int, ping [8]byte, then func(s *h2Server, id uint32) bool) func(net.Conn) {
	return pingedH2(ping, func(s *h2Server, id uint32) {
		writeGRPCHeaders(s.fr, id)
		for range k {
			s.fr.WriteData(id, false, msg)
		}
		s.fr.WriteData(id, false, msg[:len(msg)/2])
	}, then)
}
