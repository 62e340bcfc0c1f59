package proxy

import (
	"fmt"
	"io"
	"net"
	"time"

	"golang.org/x/net/http2"
)

// This file holds the per-connection limits on what a client may make the
// proxy do for nothing: streams reset before their answer (rapid reset,
// CVE-2023-44487) and "glitches", frames that are legal or nearly so but
// that no well-behaved client sends in numbers (HAProxy's
// tune.h2.fe.glitches-threshold). Past either limit the connection ends
// with GOAWAY(ENHANCE_YOUR_CALM) (RFC 9113 §5.4.1, §11).

// calmWindow is the period over which resets and glitches are counted;
// counts start again at zero in each window, so a long-lived connection
// with an occasional cancellation or stray frame is never cut.
const calmWindow = 10 * time.Second

// maxSettingsPerFrame bounds the entries of one SETTINGS frame. RFC 9113
// defines six settings; x/net/http2's server hangs up above 100 too.
const maxSettingsPerFrame = 100

// calmMeter counts one connection's early resets (client connections
// only) and glitches in the current calmWindow. Guarded by the
// connection's mu.
type calmMeter struct {
	start    time.Time
	opened   int // streams opened in the window
	resets   int // streams the client reset before their response ended
	glitches int
	strays   int // frames on closed streams
	ignored  int // PRIORITY frames, frames of unknown types, HEADERS above our GOAWAY
	// dataFrames and dataBytes count the client's non-empty DATA frames
	// and their payload in the window (see dataLocked).
	dataFrames, dataBytes int

	// windowUpdates counts the peer's WINDOW_UPDATE frames over the
	// connection's life, kept across windows (see windowUpdateOverLocked).
	windowUpdates int64
}

// straysPerStream is how many frames on closed streams a client may send
// per stream it opened in the window before they count as glitches. RFC
// 9113 allows them in a race (§5.1 "closed", §6.9: "a receiver MUST NOT
// treat this as an error"), and a good client sends them routinely: a
// grpc-go client whose application reads a server stream's last messages
// after END_STREAM arrived sends a WINDOW_UPDATE for each quarter of the
// stream window it frees, then may cancel (RST_STREAM). Charging each one
// cut such a client at about 100 streams a second. A flood on few
// streams still spends the budget.
const straysPerStream = 4

// rollLocked starts a new window if the current one is over.
func (m *calmMeter) rollLocked(now time.Time) {
	if now.Sub(m.start) >= calmWindow {
		*m = calmMeter{start: now, windowUpdates: m.windowUpdates}
	}
}

// meterLocked implements errorPolicy.
func (c *serverConn) meterLocked() *calmMeter { return &c.calm }

// meterLocked implements errorPolicy.
func (b *backendConn) meterLocked() *calmMeter { return &b.calm }

// errCalm is the connection error for a client past one of the limits:
// reason goes into the GOAWAY's debug data.
func errCalm(format string, args ...any) error {
	return fmt.Errorf("proxy: "+format+": %w", append(args, http2.ConnectionError(http2.ErrCodeEnhanceYourCalm))...)
}

// earlyResetAge is the age below which a stream the client resets before
// its response ended counts as an early reset: Envoy's "premature reset"
// (its premature_reset_min_stream_lifetime_seconds, 1 s). A rapid-reset
// attack resets each stream as soon as it opened it; a client that cancels
// a call it waited a second or more for does what clients do (a user gave
// up, a hedged call lost, a watch ended), and paid a second per stream
// slot for it. Counting those too closed the connection of a client whose
// calls to a slow backend were all cancelled, cutting its healthy calls
// on the same connection (attack round 3).
const earlyResetAge = time.Second

// streamOpenedLocked counts a stream the client opened at now. Caller
// must hold mu.
func (c *serverConn) streamOpenedLocked(now time.Time) {
	c.calm.rollLocked(now)
	c.calm.opened++
}

// earlyResetLocked counts stream s, which the client reset before its
// response ended, if it was younger than earlyResetAge, and reports a
// connection error once there were more than Config.MaxEarlyResets in the
// window and they were more than half of the streams opened in it. The
// fraction spares a busy client that cancels some of its calls; an
// attacker gains nothing from streams it must let finish or hold for a
// second each. Caller must hold mu.
func (c *serverConn) earlyResetLocked(s *stream) error {
	max := c.srv.cfg.MaxEarlyResets
	if max <= 0 {
		return nil
	}
	now := c.srv.now()
	if now.Sub(s.start) >= earlyResetAge {
		return nil
	}
	c.calm.rollLocked(now)
	c.calm.resets++
	if c.calm.resets > max && 2*c.calm.resets > c.calm.opened {
		return errCalm("%d streams reset before their response in %v (rapid reset)", c.calm.resets, calmWindow)
	}
	return nil
}

// glitchLocked charges the connection points for a frame that did no
// useful work, and reports a connection error once the window's total
// passes Config.MaxGlitches. Caller must hold mu.
func (c *serverConn) glitchLocked(points int, what string) error {
	return c.calm.chargeLocked(c.srv.now(), c.srv.cfg.MaxGlitches, points, what)
}

// glitchLocked implements errorPolicy for a backend connection, with the
// client side's budget: a backend is ours, but a broken or compromised one
// flooding PING, SETTINGS, WINDOW_UPDATE, empty DATA or frames on
// closed streams would otherwise cost the proxy CPU, and the clients whose
// calls share its connection, without limit. Past the budget the
// connection ends with GOAWAY(ENHANCE_YOUR_CALM); its calls end as for any
// lost backend connection (UNAVAILABLE, retried where the policy allows),
// and the Picker hears of each as a failure of the backend. Caller must
// hold mu.
func (b *backendConn) glitchLocked(points int, what string) error {
	return b.calm.chargeLocked(b.pool.srv.now(), b.pool.srv.cfg.MaxGlitches, points, what)
}

// chargeLocked adds points to the window's glitches and reports a
// connection error once they pass max (no limit when max <= 0).
func (m *calmMeter) chargeLocked(now time.Time, max, points int, what string) error {
	if max <= 0 {
		return nil
	}
	m.rollLocked(now)
	m.glitches += points
	if m.glitches > max {
		return errCalm("glitch budget of %d per %v spent, last on %s", max, calmWindow, what)
	}
	return nil
}

// Tiny DATA frames. A gRPC message is at least its 5-byte prefix, and
// grpc-go writes each message, prefix and payload, into as few DATA frames
// as the frame size and the flow-control windows allow; a frame shorter
// than a prefix comes only from a window or frame-size boundary inside a
// message, a handful per window. A client that sends such frames by the
// thousand, averaging under 5 bytes a frame, makes the proxy do a frame's
// work (and keep a replay entry, on a retryable call) per byte. nginx
// judges this per connection by bytes received against payload (its
// "http2 flood detected" when total_bytes/8 > payload_bytes + 1 MiB);
// we judge DATA frames alone, which is tighter and spares the control
// frames the other limits judge: once a window has seen tinyDataFrames
// non-empty DATA frames averaging under tinyDataPayload bytes, each
// further frame under tinyDataPayload that does not end its stream is a
// glitch. A frame of a whole message never is, whatever its size.
const (
	tinyDataPayload = 5
	tinyDataFrames  = 1024
)

// dataLocked counts a non-empty DATA frame of n bytes from the client,
// and charges a glitch for a tiny one past the allowance above. Only a
// tiny frame reads the clock. Caller must hold mu.
func (c *serverConn) dataLocked(n int, end bool) error {
	m := &c.calm
	tiny := n < tinyDataPayload && !end
	if tiny {
		m.rollLocked(c.srv.now())
	}
	m.dataFrames++
	m.dataBytes += n
	if !tiny || m.dataFrames < tinyDataFrames || m.dataBytes >= tinyDataPayload*m.dataFrames {
		return nil
	}
	return c.glitchLocked(1, "DATA frames of under 5 bytes on average")
}

// limitGlitch is the glitch a stream costs its client connection when the
// proxy refuses it because the connection reached one of its limits
// (HAProxy counts a HEADERS frame over MAX_CONCURRENT_STREAMS as one): a
// client that keeps opening streams past a limit, each costing a header
// decode and an answer, ends with GOAWAY(ENHANCE_YOUR_CALM) rather than
// being refused forever. Limits of the whole server (Config.MaxStreams)
// are not the client's doing and cost nothing. Caller must hold mu.
func (c *serverConn) limitGlitchLocked(what string) error {
	return c.glitchLocked(1, what)
}

// strayLocked counts a frame on a closed stream: free up to
// straysPerStream per stream opened in the window, a glitch point beyond.
// Caller must hold mu.
func (m *calmMeter) strayLocked(now time.Time, max int, what string) error {
	m.rollLocked(now)
	m.strays++
	if m.strays <= straysPerStream*m.opened {
		return nil
	}
	return m.chargeLocked(now, max, 1, what)
}

// strayLocked implements errorPolicy. Caller must hold mu.
func (c *serverConn) strayLocked(what string) error {
	return c.calm.strayLocked(c.srv.now(), c.srv.cfg.MaxGlitches, what)
}

// strayLocked implements errorPolicy: a backend gets the same allowance
// per stream the proxy opened on it (a grpc-go server may send a
// WINDOW_UPDATE for request bytes it read after the stream ended). Caller
// must hold mu.
func (b *backendConn) strayLocked(what string) error {
	return b.calm.strayLocked(b.pool.srv.now(), b.pool.srv.cfg.MaxGlitches, what)
}

// PRIORITY frames (RFC 9113 §5.3.2: deprecated; we follow none) and
// frames of types we do not know (§4.1, §5.5: ignored) do no work
// either, but a peer may send them: a browser-style client a few PRIORITY
// frames for its dependency tree and a PRIORITY_UPDATE (RFC 9218) per
// request. Unmetered, a flood of them (9 to 14 bytes each) kept a core
// busy for as long as the peer sent them, as §10.5 warns. Envoy allows
// 100 PRIORITY frames per stream opened
// (max_inbound_priority_frames_per_stream) and closes the connection
// past that; here each beyond ignoredFree plus ignoredPerStream per
// stream opened in the window is a glitch point.
const (
	ignoredFree      = 100
	ignoredPerStream = 100
)

// ignoredLocked counts a PRIORITY frame, a frame of an unknown type or,
// on a client connection, a HEADERS frame above the last stream id of
// our final GOAWAY (serverConn.onHeaders): free up to the allowance
// above, a glitch point beyond. Caller must hold mu.
func (m *calmMeter) ignoredLocked(now time.Time, max int, what string) error {
	m.rollLocked(now)
	m.ignored++
	if m.ignored <= ignoredFree+ignoredPerStream*m.opened {
		return nil
	}
	return m.chargeLocked(now, max, 1, what)
}

// ignoredLocked implements errorPolicy. Caller must hold mu.
func (c *serverConn) ignoredLocked(what string) error {
	return c.calm.ignoredLocked(c.srv.now(), c.srv.cfg.MaxGlitches, what)
}

// ignoredLocked implements errorPolicy, with the allowance per stream the
// proxy opened on the backend. Caller must hold mu.
func (b *backendConn) ignoredLocked(what string) error {
	return b.calm.ignoredLocked(b.pool.srv.now(), b.pool.srv.cfg.MaxGlitches, what)
}

// Envoy's allowance for WINDOW_UPDATE frames
// (max_inbound_window_update_frames_per_data_frame_sent, default 10): a
// receiver returns window for what it received, so a well-behaved peer
// sends about one WINDOW_UPDATE per frame of ours it read, for the stream
// and the connection, plus a few when it grows its windows (grpc-go's
// BDP estimation). Neither increments nor the window's state tell a flood
// apart: grpc-go returns the 5 bytes of an empty message in a
// WINDOW_UPDATE of its own before each BDP PING, grants a stream extra
// window for each message larger than it, and may send two updates with
// none of our frames between them.
const (
	windowUpdatesFree     = 5  // allowed before we sent anything
	windowUpdatesPerFrame = 10 // allowed per HEADERS or DATA frame we sent
)

// windowUpdateOverLocked counts a WINDOW_UPDATE from the peer and reports
// whether the connection's updates now exceed windowUpdatesFree +
// windowUpdatesPerFrame per HEADERS or DATA frame we sent: each one past
// that is a glitch. Caller must hold mu.
func (t *transport) windowUpdateOverLocked(m *calmMeter) bool {
	m.windowUpdates++
	return m.windowUpdates > windowUpdatesFree+windowUpdatesPerFrame*t.framesSent.Load()
}

// checkSettings rejects a SETTINGS frame no client needs, before its
// entries are applied: applying one costs a pass over every stream.
func checkSettings(f *http2.SettingsFrame) error {
	if f.NumSettings() > maxSettingsPerFrame || f.HasDuplicates() {
		return errCalm("SETTINGS frame with %d entries or duplicates", f.NumSettings())
	}
	return nil
}

// maxEmptyContinuations is how many empty CONTINUATION frames in a row a
// peer may send inside one header block. hpack encoders never split a
// block into empty fragments; the Framer bounds CONTINUATION by header
// bytes (CVE-2023-45288) but loops over empty ones inside ReadFrame, where
// no frame handler, and so no glitch budget, sees them.
const maxEmptyContinuations = 8

// contGuard sits between the Framer and the buffered socket and watches
// the frame headers go by, for what ReadFrame hides: past
// maxEmptyContinuations empty CONTINUATION frames in a row, its next Read
// fails with ENHANCE_YOUR_CALM, which ReadFrame returns.
type contGuard struct {
	r       io.Reader
	hdr     [9]byte // frame header being read
	nhdr    int     // bytes of hdr read so far
	payload int     // payload bytes of the current frame still to come
	empty   int     // empty CONTINUATION frames in a row
	err     error   // sticky: io.ReadFull drops an error that comes with enough bytes
	// For parking (park.go), set on client connections that can park:
	// pk is the connection's, nc its socket, frames counts the frame
	// headers read, and inBlock is set by readHeaderBlock while it reads
	// a CONTINUATION frame.
	pk      *parkCtl
	nc      net.Conn
	frames  uint64
	inBlock bool
	// largest is the largest payload of a frame read through the guard
	// (by the Framer) since the reader last had a new Framer: the size
	// of the Framer's read buffer (transport.newReadFramer).
	largest int
}

func (g *contGuard) Read(p []byte) (int, error) {
	if g.err != nil {
		return 0, g.err
	}
	n, err := g.r.Read(p)
	if n == 0 && err != nil && g.pk != nil {
		n, err = g.parkTimeout(p, err)
	}
	for b := p[:n]; len(b) > 0; {
		if g.payload > 0 {
			k := min(g.payload, len(b))
			g.payload -= k
			b = b[k:]
			continue
		}
		k := copy(g.hdr[g.nhdr:], b)
		g.nhdr += k
		b = b[k:]
		if g.nhdr < len(g.hdr) {
			break
		}
		g.nhdr = 0
		g.frames++
		g.payload = int(g.hdr[0])<<16 | int(g.hdr[1])<<8 | int(g.hdr[2])
		g.largest = max(g.largest, g.payload)
		switch {
		case http2.FrameType(g.hdr[3]) != http2.FrameContinuation:
			g.empty = 0
		case g.payload == 0:
			if g.empty++; g.empty > maxEmptyContinuations {
				g.err = errCalm("%d empty CONTINUATION frames in a row", g.empty)
			}
		}
	}
	return n, err
}
