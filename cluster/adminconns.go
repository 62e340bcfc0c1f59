package cluster

import (
	"net"
	"net/http"
	"sync"
	"time"
)

// The admin listener shares the process's file descriptors and memory
// with the data plane, so what one of its clients can hold is bounded
// (attack round 3): before, 300 idle keep-alive connections under a
// 256-descriptor limit stopped the data plane accepting, 100 connections
// of 1 MiB unfinished headers grew the RSS by 161 MiB, and a request whose
// body never arrived held its connection for ever.
const (
	// adminMaxConns is the admin listener's connection cap: probes,
	// scrapers and status pages need a handful.
	adminMaxConns = 128
	// adminMaxHeaderBytes bounds a request's headers (net/http's default
	// is 1 MiB; nginx takes 32 KiB by default, Envoy's admin 60 KiB).
	// Over it, 431.
	adminMaxHeaderBytes = 16 << 10
	// adminReadTimeout bounds the reading of a request's headers, and of
	// a body the endpoints do not read (net/http reads what is left of it
	// before answering, with no deadline of its own).
	adminReadTimeout = 5 * time.Second
)

// adminConns caps the connections its listener accepts at max. At the cap
// a new connection takes the place of the one that has waited longest for
// a request (idle keep-alive, or not done sending its headers: each
// bounded in time anyway), or, when every connection is serving a
// request, of the one serving its request longest: a client holding
// connections, idle or busy (a body sent slowly, a profile's seconds),
// cannot lock out a liveness probe, whose request takes a moment. It
// would have to open max connections within that moment. ConnState must
// be the http.Server's ConnState.
type adminConns struct {
	net.Listener
	max int

	mu sync.Mutex
	// mu guards the fields below.
	conns map[net.Conn]adminConn
	seq   uint64 // orders the waits
}

type adminConn struct {
	busy  bool   // serving a request
	since uint64 // seq when it started waiting for one, or serving it
}

func newAdminConns(ln net.Listener, limit int) *adminConns {
	return &adminConns{Listener: ln, max: max(limit, 1), conns: make(map[net.Conn]adminConn)}
}

func (l *adminConns) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	var evict net.Conn
	if len(l.conns) >= l.max {
		var oldest adminConn
		for c, st := range l.conns {
			if evict == nil || older(st, oldest) {
				evict, oldest = c, st
			}
		}
		delete(l.conns, evict)
	}
	l.seq++
	l.conns[nc] = adminConn{since: l.seq}
	l.mu.Unlock()
	if evict != nil {
		evict.Close()
	}
	return nc, nil
}

// older reports whether a is to be evicted before b: waiting connections
// before busy ones, then the longest waiting or busy.
func older(a, b adminConn) bool {
	if a.busy != b.busy {
		return !a.busy
	}
	return a.since < b.since
}

// ConnState tracks which connections serve a request.
func (l *adminConns) ConnState(nc net.Conn, state http.ConnState) {
	l.mu.Lock()
	defer l.mu.Unlock()
	st, ok := l.conns[nc]
	if !ok {
		return // evicted
	}
	switch state {
	case http.StateActive, http.StateIdle:
		l.seq++
		st.busy, st.since = state == http.StateActive, l.seq
	case http.StateClosed, http.StateHijacked:
		delete(l.conns, nc)
		return
	default:
		return
	}
	l.conns[nc] = st
}

// boundBody gives a request with a body adminReadTimeout to send it: no
// admin endpoint reads one, and net/http reads what is left of it before
// answering, with no deadline once the headers are in. A body sent in
// time is discarded as before; one that is not ends the connection after
// the answer. Requests without a body keep no read deadline, so a long
// profile is not cut when the connection's background read times out.
func boundBody(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength != 0 { // -1: chunked
			http.NewResponseController(w).SetReadDeadline(time.Now().Add(adminReadTimeout))
		}
		h.ServeHTTP(w, r)
	})
}
