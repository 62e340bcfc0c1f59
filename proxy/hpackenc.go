package proxy

import (
	"bytes"
	"strings"

	"golang.org/x/net/http2/hpack"
)

// headerEncoder is a connection's HPACK encoder (x/net's) with a memo of
// the fields it encoded as indexes.
//
// gRPC sends the same header blocks call after call: the request's
// pseudo-headers, content-type, te and user-agent; the response's :status
// and content-type; trailers with grpc-status 0. Once a block's fields
// are in the dynamic table, each is encoded as a one- or two-byte index,
// but x/net's Encoder finds that index with four map lookups per field,
// hashing the name and the value: at 2,000 calls/s about 5% of the
// proxy's CPU (BENCHMARKS.md). The memo keeps the last maxMemoFields
// fields encoded as an index and the index's bytes; a field equal to one
// of them, with the dynamic table unchanged since, is written from the
// memo after a few string comparisons.
//
// The table changes when the encoder inserts a field (a literal with
// incremental indexing, first byte 01xxxxxx) or changes its size (the
// update it writes, 001xxxxx, or SetMaxDynamicTableSizeLimit); every
// insertion renumbers the entries already there, so any change voids the
// whole memo (gen). A reference to an entry does not change the table
// (RFC 7541 §2.3: it is a FIFO), so writing memo bytes keeps encoder and
// peer decoder in step.
//
// Fields whose value changes with every call are written as literals
// without indexing (RFC 7541 §6.2.2), so they neither churn the table,
// evicting the entries the memo refers to, nor make the peer's decoder
// store them: grpc-timeout, the one gRPC sends.
//
// It is used by the connection's writer only.
type headerEncoder struct {
	enc *hpack.Encoder
	gen uint32 // bumped by every change of the dynamic table
	// sizeChanged is set by setMaxTableSizeLimit: the next block goes
	// through enc field by field, so the size update it owes the peer
	// comes first (RFC 7541 §4.2).
	sizeChanged bool
	// memo holds fields encoded as indexes while the table was at
	// memoGen; next is the one a new field replaces once it is full, and
	// hint where the next lookup starts (blocks repeat in order).
	memo    []memoField
	memoGen uint32
	next    int
	hint    int
}

// memoField is a field and the bytes of the index it is encoded as.
type memoField struct {
	name, value string
	code        [4]byte
	n           uint8 // len(code)
}

// maxMemoFields bounds the memo: the distinct fields of a connection's
// usual blocks (a request's, or a response's and its trailers', from a
// few backends).
const maxMemoFields = 32

func newHeaderEncoder(w *switchWriter) *headerEncoder {
	return &headerEncoder{enc: hpack.NewEncoder(w)}
}

// setMaxTableSizeLimit applies the peer's SETTINGS_HEADER_TABLE_SIZE.
func (e *headerEncoder) setMaxTableSizeLimit(v uint32) {
	e.enc.SetMaxDynamicTableSizeLimit(v)
	e.gen++ // the table may shrink, evicting entries the memo refers to
	e.sizeChanged = true
}

// volatileField reports a field whose value differs call by call, which
// is written without indexing.
func volatileField(name string) bool { return name == "grpc-timeout" }

// encode appends the HPACK encoding of fields to buf, which must be where
// e's Encoder writes.
func (e *headerEncoder) encode(buf *bytes.Buffer, fields []hpack.HeaderField) error {
	plain := e.sizeChanged
	e.sizeChanged = false
	startGen := e.gen
	useMemo := e.memoGen == startGen && len(e.memo) > 0 && !plain
	// learned are fields encoded as indexes the memo lacks: their
	// positions in fields and their bytes in buf.
	var learned [8]struct{ i, off, n int }
	nl := 0
	for i := range fields {
		f := &fields[i]
		if useMemo && !f.Sensitive && e.gen == startGen {
			if m := e.lookup(f); m != nil {
				buf.Write(m.code[:m.n])
				continue
			}
		}
		if !plain && !f.Sensitive && volatileField(f.Name) {
			appendLiteral(buf, f)
			continue
		}
		start := buf.Len()
		if err := e.enc.WriteField(*f); err != nil {
			return err
		}
		out := buf.Bytes()[start:]
		switch {
		case len(out) == 0:
		case out[0]&0x80 != 0: // an index
			if len(out) <= len(memoField{}.code) && !f.Sensitive && nl < len(learned) {
				learned[nl] = struct{ i, off, n int }{i, start, len(out)}
				nl++
			}
		case out[0]&0xc0 == 0x40, out[0]&0xe0 == 0x20:
			e.gen++ // an insertion, or a table size update
		}
	}
	if e.gen != startGen || e.memoGen != e.gen {
		// Indexes moved: what the memo holds, and what this block
		// learned before the move, no longer says where fields are. The
		// next block like this one is all references, learned then.
		e.memo, e.memoGen, e.next, e.hint = e.memo[:0], e.gen, 0, 0
		if e.gen != startGen {
			return nil
		}
	}
	out := buf.Bytes()
	for _, l := range learned[:nl] {
		if f := &fields[l.i]; e.lookup(f) == nil {
			e.learn(f, out[l.off:l.off+l.n])
		}
	}
	return nil
}

// lookup returns the memo's entry for f, nil if it has none. It looks
// where the last hit left off first.
func (e *headerEncoder) lookup(f *hpack.HeaderField) *memoField {
	n := len(e.memo)
	for k := range n {
		j := e.hint + k
		if j >= n {
			j -= n
		}
		if m := &e.memo[j]; m.name == f.Name && m.value == f.Value {
			e.hint = j + 1
			if e.hint == n {
				e.hint = 0
			}
			return m
		}
	}
	return nil
}

// learn adds f, encoded as code, to the memo, replacing the oldest entry
// once it is full. Name and value are copied, so the memo pins no buffer
// of the block's source.
func (e *headerEncoder) learn(f *hpack.HeaderField, code []byte) {
	var m *memoField
	if len(e.memo) < maxMemoFields {
		e.memo = append(e.memo, memoField{})
		m = &e.memo[len(e.memo)-1]
	} else {
		m = &e.memo[e.next]
		e.next = (e.next + 1) % maxMemoFields
	}
	m.name, m.value = strings.Clone(f.Name), strings.Clone(f.Value)
	m.n = uint8(copy(m.code[:], code))
}

// appendLiteral writes f as a literal field without indexing, with a
// literal name (RFC 7541 §6.2.2), Huffman-coded where that is shorter,
// as x/net's Encoder writes strings.
func appendLiteral(buf *bytes.Buffer, f *hpack.HeaderField) {
	buf.WriteByte(0x00)
	appendString(buf, f.Name)
	appendString(buf, f.Value)
}

// appendString writes s as an HPACK string literal (RFC 7541 §5.2).
func appendString(buf *bytes.Buffer, s string) {
	if hl := hpack.HuffmanEncodeLength(s); hl < uint64(len(s)) {
		appendVarInt(buf, 7, 0x80, hl)
		buf.Write(hpack.AppendHuffmanString(buf.AvailableBuffer(), s))
		return
	}
	appendVarInt(buf, 7, 0, uint64(len(s)))
	buf.WriteString(s)
}

// appendVarInt writes i as an HPACK integer with an n-bit prefix, the
// byte's other bits set from first (RFC 7541 §5.1).
func appendVarInt(buf *bytes.Buffer, n uint, first byte, i uint64) {
	k := uint64((1 << n) - 1)
	if i < k {
		buf.WriteByte(first | byte(i))
		return
	}
	buf.WriteByte(first | byte(k))
	i -= k
	for ; i >= 128; i >>= 7 {
		buf.WriteByte(byte(0x80 | (i & 0x7f)))
	}
	buf.WriteByte(byte(i))
}
