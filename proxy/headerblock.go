package proxy

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// headerBlock is a HEADERS frame with its CONTINUATION frames and its
// decoded fields, as x/net's MetaHeadersFrame is. The transport assembles
// it itself (Framer.ReadMetaHeaders is nil) so that decoding a block costs
// one allocation, the fields slice the block hands on, instead of a
// MetaHeadersFrame, its emit closure and the growth of its field slice.
// The checks are x/net's readMetaFrame's, in the same order; the empty
// CONTINUATION guard (contGuard) sits below the Framer as before.
//
// A headerBlock and its Fields are the transport's and valid until its
// next readFrame: a caller that keeps fields copies them (keepFields).
type headerBlock struct {
	*http2.HeadersFrame
	Fields    []hpack.HeaderField
	Truncated bool
}

// PseudoFields returns the pseudo-header fields of the block, which
// checkPseudos has placed before the regular ones.
func (h *headerBlock) PseudoFields() []hpack.HeaderField {
	for i, f := range h.Fields {
		if !strings.HasPrefix(f.Name, ":") {
			return h.Fields[:i]
		}
	}
	return h.Fields
}

// hdecState is the reader's HPACK decoder and the state its emit function
// works on while one block is decoded. Reader goroutine only.
type hdecState struct {
	dec            *hpack.Decoder
	fields         []hpack.HeaderField // scratch, reused block after block
	headersRemain  uint32
	trailersRemain uint32
	sawRegular     bool
	truncated      bool
	invalid        error
	block          headerBlock
	// open is set while a header block is being read: from its HEADERS
	// frame to the frame with END_HEADERS. Left set when reading the
	// block failed, so that the Framer, which then expects CONTINUATION,
	// reads every later frame (bufferedFrame).
	open bool
	// own holds the last header block taken from the read buffer
	// (ownBlock).
	own []byte
}

// ownBlockMax is the largest header block taken from the read buffer and
// copied by ownBlock: a gRPC call's blocks are a few hundred bytes.
const ownBlockMax = 1 << 10

// ownBlock returns a copy of p, a header block in the read buffer, for the
// decoder. The decoder keeps a zero-length slice of what it was given
// (x/net hpack.Decoder.buf) until its next block: given the read buffer,
// it kept the connection's 64 KiB read buffer from the collector once the
// pool had let go of it, and 100 client connections idle after a call
// held 6.3 MiB (TestIdleConnsKeepNoReadBuffer). The copy goes into storage
// of the connection's own, reused block after block, sized to the block:
// a few hundred bytes. A block over ownBlockMax is not taken from the read
// buffer (takeHeaders): it is read by the Framer, into the Framer's
// buffer.
func (h *hdecState) ownBlock(p []byte) []byte {
	if cap(h.own) < len(p) {
		h.own = make([]byte, 0, max(len(p), 128))
	}
	h.own = append(h.own[:0], p...)
	return h.own
}

// blockDone lets go of the decoded fields of the block just handled: the
// roles copied what they keep (keepFields), and the scratch slice would
// otherwise keep the last block's strings, up to MaxHeaderListSize, for as
// long as the connection sits idle (attack: about 56 KB per connection
// after one call with 56 KB of headers).
func (h *hdecState) blockDone() {
	clear(h.fields)
	h.fields = h.fields[:0]
	h.block = headerBlock{}
}

var errPseudoAfterRegular = errors.New("pseudo header field after regular")

// emit is the decoder's emit function, set once per connection: the checks
// and size accounting of x/net's readMetaFrame, appending to the scratch
// slice.
func (h *hdecState) emit(hf hpack.HeaderField) {
	if !httpguts.ValidHeaderFieldValue(hf.Value) {
		// The value may be sensitive: it is not in the error.
		h.invalid = fmt.Errorf("invalid header field value for %q", hf.Name)
	}
	if strings.HasPrefix(hf.Name, ":") {
		if h.sawRegular {
			h.invalid = errPseudoAfterRegular
		}
	} else {
		h.sawRegular = true
		if !validWireHeaderFieldName(hf.Name) {
			h.invalid = fmt.Errorf("invalid header field name %q", hf.Name)
		}
	}
	if h.invalid != nil {
		h.dec.SetEmitEnabled(false)
		return
	}
	remain := &h.headersRemain
	var size uint32
	if hf.Name == "trailer" {
		remain = &h.trailersRemain
		n := strings.Count(hf.Value, ",") + 1
		size = uint32(len(hf.Value)-n+1) + uint32(n)*hpack.HeaderField{}.Size()
	} else {
		size = hf.Size()
	}
	if size > *remain {
		h.dec.SetEmitEnabled(false)
		h.truncated = true
		h.headersRemain, h.trailersRemain = 0, 0
		return
	}
	*remain -= size
	h.fields = append(h.fields, hf)
}

// validWireHeaderFieldName is x/net/http2's: a token, no upper case
// (RFC 9113 §8.2.1). It looks bytes up in a table rather than decoding
// runes: every byte of a token is ASCII, so a byte of a multi-byte UTF-8
// sequence (or of invalid UTF-8) fails either way.
func validWireHeaderFieldName(v string) bool {
	if len(v) == 0 {
		return false
	}
	for i := 0; i < len(v); i++ {
		if !wireNameByte[v[i]] {
			return false
		}
	}
	return true
}

// wireNameByte tells the bytes validWireHeaderFieldName allows.
var wireNameByte = func() (t [256]bool) {
	for c := rune(0); c < 0x80; c++ {
		t[c] = httpguts.IsTokenRune(c) && !('A' <= c && c <= 'Z')
	}
	return t
}()

// readFrame reads the next frame, assembling a HEADERS frame and its
// CONTINUATION frames into a *headerBlock. Reader goroutine only.
func (t *transport) readFrame() (http2.Frame, error) {
	f, err := t.rfr.ReadFrame()
	if err != nil {
		// A HEADERS frame refused with a stream error (padding longer
		// than its payload) still opened a block for the Framer's
		// checkFrameOrder if it had no END_HEADERS: only CONTINUATION
		// may follow (RFC 9113 §6.2, §6.10). As after a block whose
		// reading failed, the Framer reads every later frame, so that
		// none is taken from the read buffer as if the block had ended.
		// The contGuard holds the header of the frame the Framer read.
		var se http2.StreamError
		if h := t.cg.hdr; errors.As(err, &se) && t.cg.nhdr == 0 && t.cg.payload == 0 &&
			http2.FrameType(h[3]) == http2.FrameHeaders && !http2.Flags(h[4]).Has(http2.FlagHeadersEndHeaders) {
			t.hd.open = true
		}
		return nil, err
	}
	switch f := f.(type) {
	case *http2.HeadersFrame:
		return t.readHeaderBlock(f, f.HeaderBlockFragment())
	case *http2.ContinuationFrame:
		// The end of a block refused above (the Framer passes no other
		// CONTINUATION): its frames are ignored, and the frames after it
		// may be taken from the read buffer again.
		if f.HeadersEnded() {
			t.hd.open = false
		}
	}
	return f, nil
}

type headersOrContinuation interface {
	HeaderBlockFragment() []byte
	HeadersEnded() bool
}

// readHeaderBlock decodes the block hf starts with its fragment frag, as
// x/net's readMetaFrame does: the Framer's checkFrameOrder guarantees that
// the frames that follow until END_HEADERS are CONTINUATION frames of the
// same stream.
func (t *transport) readHeaderBlock(hf *http2.HeadersFrame, frag []byte) (http2.Frame, error) {
	h := &t.hd
	limit := t.rfr.MaxHeaderListSize
	if limit == 0 {
		limit = 16 << 20 // x/net's default
	}
	maxString := int(limit)
	if maxString < 0 {
		maxString = 0
	}
	clear(h.fields) // a block that failed left its fields (blockDone)
	h.fields = h.fields[:0]
	h.headersRemain, h.trailersRemain = limit, limit
	h.sawRegular, h.truncated, h.invalid = false, false, nil
	if h.dec == nil {
		// Made at the first header block: a connection that never
		// carries a call does not hold a decoder (issue 12).
		h.dec = hpack.NewDecoder(4096, h.emit)
	}
	h.dec.SetEmitEnabled(true)
	h.dec.SetMaxStringLength(maxString)
	var hc headersOrContinuation = hf
	h.open = true
	// The whole block's encoded bytes are bounded too, at what the check
	// below lets its first fragment have: a dynamic table size update
	// (RFC 7541 §6.3) emits no field, so fragments made of them never
	// lowered the budgets (x/net's decoder takes any number of them while
	// its table is empty), and a client kept a reader decoding
	// CONTINUATION frames for as long as it sent them: 373 MiB in 5 s,
	// its connection open. A block of fields is smaller encoded than
	// counted (32 bytes a field), unless Huffman-coded to more than its
	// length, which no encoder does.
	maxBlock := 2 * (int64(h.headersRemain) + int64(h.trailersRemain))
	var blockBytes int64
	for first := true; ; first = false {
		if !first {
			frag = hc.HeaderBlockFragment()
		}
		// Stop parsing a block far over the limit, and any CONTINUATION
		// once over it (both budgets 0) or after an invalid field, whose
		// size is no longer tracked: CVE-2023-45288, as x/net does.
		blockBytes += int64(len(frag))
		if int64(len(frag)) > 2*int64(h.headersRemain+h.trailersRemain) || blockBytes > maxBlock {
			return nil, http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if h.invalid != nil {
			return nil, http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if _, err := h.dec.Write(frag); err != nil {
			return nil, http2.ConnectionError(http2.ErrCodeCompression)
		}
		if hc.HeadersEnded() {
			h.open = false
			break
		}
		t.cg.inBlock = true // no parking inside a header block (park.go)
		f, err := t.rfr.ReadFrame()
		t.cg.inBlock = false
		if err != nil {
			return nil, err
		}
		cf, ok := f.(*http2.ContinuationFrame)
		if !ok {
			return nil, http2.ConnectionError(http2.ErrCodeProtocol) // checkFrameOrder rules this out
		}
		hc = cf
	}
	if err := h.dec.Close(); err != nil {
		return nil, http2.ConnectionError(http2.ErrCodeCompression)
	}
	if h.invalid != nil {
		return nil, http2.StreamError{StreamID: hf.StreamID, Code: http2.ErrCodeProtocol, Cause: h.invalid}
	}
	if err := checkPseudos(h.fields); err != nil {
		return nil, http2.StreamError{StreamID: hf.StreamID, Code: http2.ErrCodeProtocol, Cause: err}
	}
	h.block = headerBlock{HeadersFrame: hf, Fields: h.fields, Truncated: h.truncated}
	return &h.block, nil
}

// keepFields copies fields, then extra, into the unused room of *room,
// which it shrinks by as much, or into a new slice when they do not fit.
// It is how a header block outlives the reader's next frame without an
// allocation of its own: streams and attempts carry room for the blocks
// of a typical call.
func keepFields(room *[]hpack.HeaderField, fields []hpack.HeaderField, extra ...hpack.HeaderField) []hpack.HeaderField {
	n := len(fields) + len(extra)
	if n > len(*room) {
		return append(append(make([]hpack.HeaderField, 0, n), fields...), extra...)
	}
	copy((*room)[copy(*room, fields):], extra)
	out := (*room)[:n:n]
	*room = (*room)[n:]
	return out
}

// checkPseudos is x/net's MetaHeadersFrame.checkPseudos: known
// pseudo-headers only, no duplicates, not both request and response ones
// (RFC 9113 §8.3). emit already put them all first.
func checkPseudos(fields []hpack.HeaderField) error {
	var isRequest, isResponse bool
	pf := (&headerBlock{Fields: fields}).PseudoFields()
	for i, hf := range pf {
		switch hf.Name {
		case ":method", ":path", ":scheme", ":authority", ":protocol":
			isRequest = true
		case ":status":
			isResponse = true
		default:
			return fmt.Errorf("invalid pseudo-header %q", hf.Name)
		}
		for _, hf2 := range pf[:i] {
			if hf.Name == hf2.Name {
				return fmt.Errorf("duplicate pseudo-header %q", hf.Name)
			}
		}
	}
	if isRequest && isResponse {
		return errors.New("mix of request and response pseudo headers")
	}
	return nil
}
