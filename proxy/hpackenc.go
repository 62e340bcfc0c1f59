package proxy

import "golang.org/x/net/http2/hpack"

// hpackEncoder is a connection's HPACK encoder (RFC 7541), used by its
// writer only, in the order header blocks go on the wire. It replaces
// x/net's hpack.Encoder on the relay's hot path: that one looks every field
// up in two maps of the static table and two of the dynamic one, hashing
// name and value each time, and indexes every field, so a value new with
// each call (grpc-timeout) is inserted, evicts an older entry and churns
// the maps once per call. In a CPU profile of small unary calls at full
// speed it was about 10% of the proxy's CPU (BENCHMARKS.md, "Unary fast
// path").
//
// Its choices, all of them representations RFC 7541 §6 allows an encoder:
//
//   - a field equal to a static table entry is that entry's index (a
//     switch on the name, no hashing);
//   - the dynamic table is found through a small cache of the entries this
//     encoder inserted, direct-mapped by a cheap hash of name and value
//     (two places per hash): a hit is the entry's index, a miss (never
//     inserted, evicted, or pushed out of the cache by another field)
//     inserts the field again. The cache never claims an entry the peer's
//     table does not hold: the encoder keeps the table's books (sizes and
//     insertion order, §4.1, §4.4) itself and forgets a cached entry when
//     it is evicted;
//   - fields that change with every call (grpc-timeout) and fields too
//     large for the table are literals without indexing (§6.2.2), which
//     leave the table alone; a field the peer sent as never indexed
//     (Sensitive, §7.1.3) is relayed as never indexed;
//   - names are the static table's index when it has the name, literal
//     otherwise; strings are sent raw, without Huffman coding (§5.2 lets
//     the encoder choose), as HAProxy's encoder does: a few more bytes on
//     the wire for no CPU.
//
// The table's maximum size follows the peer's SETTINGS_HEADER_TABLE_SIZE
// down, never above the initial 4,096 bytes (as x/net's encoder does),
// and a decrease is announced by a dynamic table size update at the start
// of the next header block (§4.2, §6.3).
type hpackEncoder struct {
	maxSize    uint32 // the dynamic table's maximum size, as the peer's decoder knows it
	size       uint32 // sum of the sizes of the entries in the table (§4.1)
	sizeUpdate bool   // the next block opens with a dynamic table size update

	// Entries are numbered from 1 in insertion order; next is the number
	// of the next one. The table holds the entries next-count .. next-1.
	next  uint32
	count uint32
	// ring holds the table's entries, oldest first from head: each one's
	// size and the cache slot it was put in. Its length is a power of two
	// that grows with the entries the table holds at once, up to
	// encMaxEntries.
	ring []encEntry
	head uint32
	// slots is the cache: name and value of an entry and its number (0:
	// empty). An evicted entry's slot is emptied, so the cache holds no
	// more than the table does. It starts with encFirstSlots and grows to
	// encSlots the first time a new entry finds both its places taken.
	slots []encSlot
}

// The encoder's storage grows with what a connection's header blocks put
// in the table. A client connection's encoder carries gRPC responses,
// whose few fields the table holds (content-type, grpc-status and
// grpc-message, a backend's metadata), so it stays at 8 slots and a short
// ring: about 400 bytes where fixed arrays of the largest sizes took 2
// KiB, which every client connection that made a call held for as long as
// it stayed open, idle or not (issue 12: idle connections).
const (
	encInitialTableSize = 4096 // RFC 9113 §6.5.2's initial SETTINGS_HEADER_TABLE_SIZE
	// encMaxEntries bounds the table's entries: each counts at least 32
	// bytes (RFC 7541 §4.1) against at most encInitialTableSize.
	encMaxEntries = encInitialTableSize / 32
	encFirstSlots = 8
	encSlots      = 32
	encFirstRing  = 4
)

type encEntry struct {
	size uint16 // at most encInitialTableSize
	slot uint8
}

type encSlot struct {
	name, value string
	id          uint32
}

func newHpackEncoder() *hpackEncoder {
	return &hpackEncoder{maxSize: encInitialTableSize, next: 1}
}

// setMaxSizeLimit applies the peer's SETTINGS_HEADER_TABLE_SIZE v: the
// table shrinks to it if it is smaller than the table's maximum size, and
// the next block says so. It never grows the table (x/net's
// SetMaxDynamicTableSizeLimit does the same).
func (e *hpackEncoder) setMaxSizeLimit(v uint32) {
	if v >= e.maxSize {
		return
	}
	e.maxSize = v
	e.sizeUpdate = true
	e.evictTo(v)
}

// appendBlock appends the header block of fields to dst and returns it.
func (e *hpackEncoder) appendBlock(dst []byte, fields []hpack.HeaderField) []byte {
	if e.sizeUpdate {
		// RFC 7541 §4.2: at the start of the first block after the
		// change. The table only ever shrinks here, so the smallest size
		// of the interval is the final one and one update says it.
		e.sizeUpdate = false
		dst = appendHpackInt(dst, 0x20, 5, uint64(e.maxSize))
	}
	for i := range fields {
		dst = e.appendField(dst, &fields[i])
	}
	return dst
}

func (e *hpackEncoder) appendField(dst []byte, f *hpack.HeaderField) []byte {
	nameIdx, full := staticIndex(f.Name, f.Value)
	if f.Sensitive {
		// §7.1.3: never indexed, and an intermediary keeps it so.
		return appendLiteral(dst, 0x10, 4, nameIdx, f)
	}
	if full {
		return appendHpackInt(dst, 0x80, 7, uint64(nameIdx))
	}
	h := encHash(f.Name, f.Value)
	if len(e.slots) > 0 {
		for _, s := range e.places(h) {
			if c := &e.slots[s]; c.id != 0 && c.name == f.Name && c.value == f.Value {
				// §2.3.3: dynamic indices start after the static table's
				// 61 entries, the newest entry first.
				return appendHpackInt(dst, 0x80, 7, uint64(61+e.next-c.id))
			}
		}
	}
	size := uint32(len(f.Name)) + uint32(len(f.Value)) + 32
	if size > e.maxSize || volatileField(f.Name) {
		return appendLiteral(dst, 0x00, 4, nameIdx, f)
	}
	dst = appendLiteral(dst, 0x40, 6, nameIdx, f) // the name index refers to the table before the insert
	e.insert(f, size, h)
	return dst
}

// insert adds f, of size size, to the table (§4.4: evicting the oldest
// entries until it fits) and to the cache slot h or its neighbour, the one
// that is empty or holds the older entry.
func (e *hpackEncoder) insert(f *hpack.HeaderField, size, h uint32) {
	e.evictTo(e.maxSize - size)
	if e.slots == nil {
		e.slots = make([]encSlot, encFirstSlots)
	}
	p := e.places(h)
	if len(e.slots) < encSlots && e.slots[p[0]].id != 0 && e.slots[p[1]].id != 0 {
		e.growSlots()
		p = e.places(h)
	}
	s := p[0]
	if e.slots[p[1]].id < e.slots[s].id {
		s = p[1]
	}
	if e.count == uint32(len(e.ring)) {
		e.growRing()
	}
	id := e.next
	e.next++
	e.slots[s] = encSlot{name: f.Name, value: f.Value, id: id}
	e.ring[(e.head+e.count)&uint32(len(e.ring)-1)] = encEntry{size: uint16(size), slot: uint8(s)}
	e.count++
	e.size += size
}

// places returns the two cache slots of hash h. The cache must exist.
func (e *hpackEncoder) places(h uint32) [2]uint32 {
	mask := uint32(len(e.slots) - 1) // a power of two
	return [2]uint32{h & mask, (h + 1) & mask}
}

// growRing doubles the ring (from encFirstRing), keeping the entries in
// order from index 0. The table never holds more than encMaxEntries, so
// the ring never grows past that.
func (e *hpackEncoder) growRing() {
	r := make([]encEntry, max(2*len(e.ring), encFirstRing))
	for i := range e.count {
		r[i] = e.ring[(e.head+i)&uint32(len(e.ring)-1)]
	}
	e.ring, e.head = r, 0
}

// growSlots moves the cache to encSlots slots, each entry to a place of
// its hash there, and points the ring's entries at their new slots. An
// entry that finds both its places taken leaves the cache (it stays in
// the table, unreferenced, until it is evicted, as a pushed-out entry
// does); its ring entry keeps its old slot number, which holds another
// entry's number or none, so its eviction empties nothing.
func (e *hpackEncoder) growSlots() {
	old := e.slots
	e.slots = make([]encSlot, encSlots)
	const mask = encSlots - 1
	first := e.next - e.count // number of the oldest entry in the table
	for _, c := range old {
		if c.id == 0 {
			continue
		}
		h := encHash(c.name, c.value)
		s := h & mask
		if e.slots[s].id != 0 {
			if s = (h + 1) & mask; e.slots[s].id != 0 {
				continue
			}
		}
		e.slots[s] = c
		e.ring[(e.head+c.id-first)&uint32(len(e.ring)-1)].slot = uint8(s)
	}
}

// evictTo evicts the oldest entries until the table's size is at most
// limit.
func (e *hpackEncoder) evictTo(limit uint32) {
	for e.size > limit && e.count > 0 {
		old := e.ring[e.head]
		if id := e.next - e.count; e.slots[old.slot].id == id {
			e.slots[old.slot] = encSlot{}
		}
		e.ring[e.head] = encEntry{}
		e.head = (e.head + 1) & uint32(len(e.ring)-1)
		e.count--
		e.size -= uint32(old.size)
	}
}

// volatileField reports whether a field's value is new with almost every
// call, so that indexing it would only churn the table: grpc-timeout
// counts down from the caller's deadline.
func volatileField(name string) bool {
	return name == "grpc-timeout"
}

// encHash is the cache's hash of a field: cheap, from the lengths and a few
// bytes, which tell gRPC's usual fields apart. Its low bits pick the slot.
func encHash(name, value string) uint32 {
	h := uint32(len(name))*7 + uint32(len(value))*131
	if len(name) > 1 {
		h += uint32(name[1])*31 + uint32(name[len(name)-1])
	}
	if n := len(value); n > 0 {
		h += uint32(value[0])*3 + uint32(value[n-1])*17 + uint32(value[n/2])*5
	}
	h ^= h >> 5
	return h
}

// appendLiteral appends a literal field (§6.2) whose first byte has the
// pattern bits, with an n-bit prefix for the name's static index (0: the
// name follows as a string).
func appendLiteral(dst []byte, pattern byte, n uint8, nameIdx uint8, f *hpack.HeaderField) []byte {
	dst = appendHpackInt(dst, pattern, n, uint64(nameIdx))
	if nameIdx == 0 {
		dst = appendHpackString(dst, f.Name)
	}
	return appendHpackString(dst, f.Value)
}

// appendHpackString appends s as a string literal without Huffman coding
// (§5.2).
func appendHpackString(dst []byte, s string) []byte {
	dst = appendHpackInt(dst, 0, 7, uint64(len(s)))
	return append(dst, s...)
}

// appendHpackInt appends i as an integer with an n-bit prefix (§5.1), the
// first byte's other bits set to pattern.
func appendHpackInt(dst []byte, pattern byte, n uint8, i uint64) []byte {
	k := uint64(1)<<n - 1
	if i < k {
		return append(dst, pattern|byte(i))
	}
	dst = append(dst, pattern|byte(k))
	for i -= k; i >= 128; i >>= 7 {
		dst = append(dst, byte(0x80|i&0x7f))
	}
	return append(dst, byte(i))
}

// staticIndex looks a field up in the static table (RFC 7541 Appendix A):
// idx is the index of an entry with the field's name (0: none), and full
// reports whether that entry also has its value.
func staticIndex(name, value string) (idx uint8, full bool) {
	switch name {
	case ":authority":
		return 1, value == ""
	case ":method":
		switch value {
		case "GET":
			return 2, true
		case "POST":
			return 3, true
		}
		return 2, false
	case ":path":
		switch value {
		case "/":
			return 4, true
		case "/index.html":
			return 5, true
		}
		return 4, false
	case ":scheme":
		switch value {
		case "http":
			return 6, true
		case "https":
			return 7, true
		}
		return 6, false
	case ":status":
		switch value {
		case "200":
			return 8, true
		case "204":
			return 9, true
		case "206":
			return 10, true
		case "304":
			return 11, true
		case "400":
			return 12, true
		case "404":
			return 13, true
		case "500":
			return 14, true
		}
		return 8, false
	case "accept-encoding":
		return 16, value == "gzip, deflate"
	}
	idx = staticNameOnly(name)
	return idx, idx != 0 && value == ""
}

// staticNameOnly is the index of the static entries 15 and 17-61, whose
// value is empty.
func staticNameOnly(name string) uint8 {
	switch name {
	case "accept-charset":
		return 15
	case "accept-language":
		return 17
	case "accept-ranges":
		return 18
	case "accept":
		return 19
	case "access-control-allow-origin":
		return 20
	case "age":
		return 21
	case "allow":
		return 22
	case "authorization":
		return 23
	case "cache-control":
		return 24
	case "content-disposition":
		return 25
	case "content-encoding":
		return 26
	case "content-language":
		return 27
	case "content-length":
		return 28
	case "content-location":
		return 29
	case "content-range":
		return 30
	case "content-type":
		return 31
	case "cookie":
		return 32
	case "date":
		return 33
	case "etag":
		return 34
	case "expect":
		return 35
	case "expires":
		return 36
	case "from":
		return 37
	case "host":
		return 38
	case "if-match":
		return 39
	case "if-modified-since":
		return 40
	case "if-none-match":
		return 41
	case "if-range":
		return 42
	case "if-unmodified-since":
		return 43
	case "last-modified":
		return 44
	case "link":
		return 45
	case "location":
		return 46
	case "max-forwards":
		return 47
	case "proxy-authenticate":
		return 48
	case "proxy-authorization":
		return 49
	case "range":
		return 50
	case "referer":
		return 51
	case "refresh":
		return 52
	case "retry-after":
		return 53
	case "server":
		return 54
	case "set-cookie":
		return 55
	case "strict-transport-security":
		return 56
	case "transfer-encoding":
		return 57
	case "user-agent":
		return 58
	case "vary":
		return 59
	case "via":
		return 60
	case "www-authenticate":
		return 61
	}
	return 0
}
