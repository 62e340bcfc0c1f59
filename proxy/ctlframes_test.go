package proxy_test

import (
	"encoding/binary"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// TestControlFramesFromReadBuffer sends PING and WINDOW_UPDATE frames, each
// pair in a write of its own with a pause after it, so that each arrives
// as the first frames of a fill, and counts the frames the proxy had x/net's Framer parse meanwhile, which allocates
// one for each. The frame loop takes them from the read buffer; before,
// the Framer parsed every PING and WINDOW_UPDATE, and then the first frame
// of every fill on client connections.
func TestControlFramesFromReadBuffer(t *testing.T) {
	e := newEnv(t, envOpts{backends: 1})
	r := dialRaw(t, e.addr)
	// The proxy's SETTINGS, and its ack of ours, before counting.
	for acked, settings := false, false; !acked || !settings; {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if sf, ok := f.(*http2.SettingsFrame); ok {
			if sf.IsAck() {
				acked = true
			} else {
				settings = true
				r.fr.WriteSettingsAck()
			}
		}
	}
	// A call in progress, as when PINGs and WINDOW_UPDATEs come in a
	// call's wake: with no stream open, the writer lets go of its storage
	// after each write, and takes it again for the next.
	r.headers(1, unaryPath, false)
	// Its backend connection's dial and handshake allocate: let them
	// end before counting.
	r.fr.WritePing(false, [8]byte{'f', 'i', 'r', 's', 't'})
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if p, ok := f.(*http2.PingFrame); ok && p.IsAck() {
			break
		}
	}
	time.Sleep(200 * time.Millisecond)
	// PING on stream 0, then WINDOW_UPDATE of the connection by 1.
	pair := make([]byte, 0, 9+8+9+4)
	pair = append(pair, 0, 0, 8, byte(http2.FramePing), 0, 0, 0, 0, 0)
	pair = append(pair, "ctlframe"...)
	pair = append(pair, 0, 0, 4, byte(http2.FrameWindowUpdate), 0, 0, 0, 0, 0)
	pair = binary.BigEndian.AppendUint32(pair, 1)
	const pairs = 150 // each PING costs a glitch: well under DefaultMaxGlitches
	// Every allocation is recorded from here on: the frames the
	// proxy's frame loop has the Framer parse are counted by their
	// stacks, apart from the client's own, whatever the race
	// detector's pools allocate.
	defer func(rate int) { runtime.MemProfileRate = rate }(runtime.MemProfileRate)
	runtime.MemProfileRate = 1
	before := framerControlAllocs()
	for range pairs {
		if _, err := r.nc.Write(pair); err != nil {
			t.Fatal(err)
		}
		time.Sleep(500 * time.Microsecond)
	}
	// The proxy has read them all once it answers a PING sent last.
	if err := r.fr.WritePing(false, [8]byte{'l', 'a', 's', 't'}); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if p, ok := f.(*http2.PingFrame); ok && p.IsAck() && p.Data == [8]byte{'l', 'a', 's', 't'} {
			break
		}
	}
	got := framerControlAllocs() - before
	if got > pairs/10 {
		t.Fatalf("the proxy's Framer parsed %d PING and WINDOW_UPDATE frames of the %d sent (want under %d): the frame loop does not take them from the read buffer", got, 2*pairs, pairs/10)
	}
}

// framerControlAllocs counts the PING and WINDOW_UPDATE frames x/net's
// Framer allocated for the proxy's frame loop (transport.readFrame), as
// the memory profile has them after a collection.
func framerControlAllocs() int64 {
	runtime.GC()
	runtime.GC() // the profile is as of the last completed cycle
	var recs []runtime.MemProfileRecord
	n, _ := runtime.MemProfile(nil, true)
	for {
		recs = make([]runtime.MemProfileRecord, n+50)
		var ok bool
		if n, ok = runtime.MemProfile(recs, true); ok {
			recs = recs[:n]
			break
		}
	}
	var count int64
	for _, r := range recs {
		var parse, proxyReader bool
		frames := runtime.CallersFrames(r.Stack())
		for {
			f, more := frames.Next()
			switch {
			case strings.HasSuffix(f.Function, "http2.parsePingFrame"), strings.HasSuffix(f.Function, "http2.parseWindowUpdateFrame"):
				parse = true
			case strings.HasSuffix(f.Function, "proxy.(*transport).readFrame"):
				proxyReader = true
			}
			if !more {
				break
			}
		}
		if parse && proxyReader {
			count += r.AllocObjects
		}
	}
	return count
}
