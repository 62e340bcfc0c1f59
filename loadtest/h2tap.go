package loadtest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"golang.org/x/net/http2/hpack"
)

// HTTP/2 frame types and flags the tap looks at (RFC 9113 §6).
const (
	frameData         = 0x0
	frameHeaders      = 0x1
	frameRSTStream    = 0x3
	frameGoAway       = 0x7
	frameContinuation = 0x9

	flagEndStream  = 0x1
	flagEndHeaders = 0x4
	flagPadded     = 0x8
	flagPriority   = 0x20

	frameHeaderLen = 9

	// errCodeRefusedStream is RST_STREAM's REFUSED_STREAM (RFC 9113 §7):
	// the server did not process the stream, and grpc-go retries it
	// transparently on another stream.
	errCodeRefusedStream = 0x7
)

// clientPreface is what a client sends before its first frame (RFC 9113
// §3.4).
const clientPreface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// hpackDefaultTableSize is the dynamic table size both ends start with
// (RFC 9113 §6.5.2, SETTINGS_HEADER_TABLE_SIZE). A passive decoder must start
// there: the encoder signals any change in band, with a dynamic table size
// update (RFC 7541 §4.2, §6.3), which the decoder then follows.
const hpackDefaultTableSize = 4096

// headerFields holds the few fields the tap wants from one header block.
type headerFields struct {
	path       string // :path, on requests
	httpStatus string // :status, on responses
	grpcStatus string // grpc-status, on trailers or trailers-only responses
	backend    string // the value of the backend header, if present
}

// frameEvents receives what a frameReader finds in one direction of a
// connection. Its methods are called from the goroutine that feeds the
// reader.
type frameEvents interface {
	// headers reports a complete header block (HEADERS plus any
	// CONTINUATION frames) on a stream.
	headers(streamID uint32, endStream bool, f *headerFields)
	// dataEnd reports a DATA frame that ends its stream.
	dataEnd(streamID uint32)
	// rstStream reports RST_STREAM with its error code.
	rstStream(streamID uint32, code uint32)
	// goAway reports GOAWAY with its last stream ID.
	goAway(lastStreamID uint32)
}

// frameReader follows one direction of an HTTP/2 connection from the bytes
// it is fed, in whatever pieces they come, and reports header blocks, stream
// ends, resets and GOAWAY. It decodes every header block, in order, so its
// HPACK state tracks the sender's; payloads of other frames are skipped
// without being copied.
//
// It never fails the connection: on malformed input it stops observing and
// records the error in err. It is not safe for concurrent use; each
// direction has its own reader, fed by the one goroutine that reads or writes
// that direction.
type frameReader struct {
	ev      frameEvents
	backend string // lower-case name of the backend header
	dec     *hpack.Decoder
	fields  headerFields // filled by dec's emit function

	preface int // bytes of the client connection preface still to skip

	hdr  [frameHeaderLen]byte
	nhdr int // bytes of hdr filled
	typ  uint8
	flag uint8
	sid  uint32
	left int    // payload bytes of the current frame not yet fed
	keep bool   // the current frame's payload is collected into buf
	buf  []byte // collected payload of the current frame

	inBlock  bool   // a header block awaits CONTINUATION frames
	block    []byte // header block fragments collected so far
	blockSID uint32
	blockEnd bool // END_STREAM of the HEADERS frame that opened block

	err error // set once; the reader then ignores further input
}

// newFrameReader returns a reader for one direction. client is true for the
// client-to-server direction, which starts with the connection preface.
// backendHeader is the response header naming the backend.
func newFrameReader(client bool, backendHeader string, ev frameEvents) *frameReader {
	r := &frameReader{ev: ev, backend: backendHeader}
	if client {
		r.preface = len(clientPreface)
	}
	r.dec = hpack.NewDecoder(hpackDefaultTableSize, r.emit)
	// Accept whatever table size the peer's settings allow; the real size
	// comes from the sender's in-band size updates.
	r.dec.SetAllowedMaxDynamicTableSize(math.MaxUint32)
	return r
}

func (r *frameReader) emit(f hpack.HeaderField) {
	switch f.Name {
	case ":path":
		r.fields.path = f.Value
	case ":status":
		r.fields.httpStatus = f.Value
	case "grpc-status":
		r.fields.grpcStatus = f.Value
	case r.backend:
		if r.fields.backend == "" {
			r.fields.backend = f.Value
		}
	}
}

// feed follows p, the next bytes of the direction.
func (r *frameReader) feed(p []byte) {
	for len(p) > 0 && r.err == nil {
		switch {
		case r.preface > 0:
			n := min(r.preface, len(p))
			if string(p[:n]) != clientPreface[len(clientPreface)-r.preface:][:n] {
				r.err = errors.New("loadtest: tap: bad client preface")
				return
			}
			r.preface -= n
			p = p[n:]
		case r.nhdr < frameHeaderLen:
			n := copy(r.hdr[r.nhdr:], p)
			r.nhdr += n
			p = p[n:]
			if r.nhdr == frameHeaderLen {
				r.startFrame()
				if r.left == 0 {
					r.endFrame()
				}
			}
		default:
			n := min(r.left, len(p))
			if r.keep {
				r.buf = append(r.buf, p[:n]...)
			}
			r.left -= n
			p = p[n:]
			if r.left == 0 {
				r.endFrame()
			}
		}
	}
}

// startFrame parses the frame header in r.hdr (RFC 9113 §4.1).
func (r *frameReader) startFrame() {
	r.left = int(r.hdr[0])<<16 | int(r.hdr[1])<<8 | int(r.hdr[2])
	r.typ = r.hdr[3]
	r.flag = r.hdr[4]
	r.sid = binary.BigEndian.Uint32(r.hdr[5:]) & (1<<31 - 1)
	if r.inBlock && (r.typ != frameContinuation || r.sid != r.blockSID) {
		// RFC 9113 §6.10: a header block is contiguous.
		r.err = fmt.Errorf("loadtest: tap: frame type %d inside a header block", r.typ)
		return
	}
	switch r.typ {
	case frameHeaders, frameContinuation, frameRSTStream, frameGoAway:
		r.keep = true
	default:
		r.keep = false
	}
	r.buf = r.buf[:0]
}

// endFrame acts on the frame whose payload has been fed.
func (r *frameReader) endFrame() {
	r.nhdr = 0
	if r.err != nil {
		return
	}
	switch r.typ {
	case frameData:
		if r.flag&flagEndStream != 0 {
			r.ev.dataEnd(r.sid)
		}
	case frameHeaders:
		p := r.buf
		if r.flag&flagPadded != 0 {
			if len(p) < 1 || int(p[0]) > len(p)-1 {
				r.err = errors.New("loadtest: tap: bad HEADERS padding")
				return
			}
			p = p[1 : len(p)-int(p[0])]
		}
		if r.flag&flagPriority != 0 {
			if len(p) < 5 {
				r.err = errors.New("loadtest: tap: short HEADERS priority")
				return
			}
			p = p[5:]
		}
		r.block = append(r.block[:0], p...)
		r.blockSID = r.sid
		r.blockEnd = r.flag&flagEndStream != 0
		r.inBlock = r.flag&flagEndHeaders == 0
		if !r.inBlock {
			r.decodeBlock()
		}
	case frameContinuation:
		if !r.inBlock {
			r.err = errors.New("loadtest: tap: CONTINUATION outside a header block")
			return
		}
		r.block = append(r.block, r.buf...)
		if r.flag&flagEndHeaders != 0 {
			r.inBlock = false
			r.decodeBlock()
		}
	case frameRSTStream:
		if len(r.buf) != 4 {
			r.err = errors.New("loadtest: tap: bad RST_STREAM length")
			return
		}
		r.ev.rstStream(r.sid, binary.BigEndian.Uint32(r.buf))
	case frameGoAway:
		if len(r.buf) < 8 {
			r.err = errors.New("loadtest: tap: short GOAWAY")
			return
		}
		r.ev.goAway(binary.BigEndian.Uint32(r.buf) & (1<<31 - 1))
	}
}

// decodeBlock decodes the complete header block in r.block. Every block is
// decoded, whatever its stream, to keep the HPACK state in step.
func (r *frameReader) decodeBlock() {
	r.fields = headerFields{}
	if _, err := r.dec.Write(r.block); err != nil {
		r.err = fmt.Errorf("loadtest: tap: hpack: %w", err)
		return
	}
	if err := r.dec.Close(); err != nil {
		r.err = fmt.Errorf("loadtest: tap: hpack: %w", err)
		return
	}
	f := r.fields
	r.ev.headers(r.blockSID, r.blockEnd, &f)
}
