package proxy

import (
	crand "crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// hopByHop reports whether a header is connection-specific and must not be
// relayed (RFC 9113 §8.2.2; RFC 9110 §7.6.1).
func hopByHop(name string) bool {
	switch name {
	case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade", "http2-settings":
		return true
	}
	return false
}

// filterFields returns the fields of a response to relay, without
// hop-by-hop headers. It returns fields itself when nothing is dropped,
// which is the common case. A request with one is malformed instead
// (parseRequest). "te" may only be "trailers" in HTTP/2 and gRPC requires
// it, so it passes.
func filterFields(fields []hpack.HeaderField) []hpack.HeaderField {
	for i, f := range fields {
		if hopByHop(f.Name) {
			out := append([]hpack.HeaderField(nil), fields[:i]...)
			for _, f := range fields[i+1:] {
				if !hopByHop(f.Name) {
					out = append(out, f)
				}
			}
			return out
		}
	}
	return fields
}

// oneContentType returns the fields of a request with more than one
// content-type field, in a new slice, with one content-type field left:
// the first whose value is ct, the one parseRequest judged the request
// by. grpc-go's server takes a request if any of its content-types is
// gRPC's and ignores the others; relayed as they came, a backend that
// reads the first, or joins them with a comma (as Envoy's header map
// does, a value no gRPC server takes), would judge the request otherwise
// than the proxy did (TestDuplicateContentType).
func oneContentType(fields []hpack.HeaderField, ct string) []hpack.HeaderField {
	out := make([]hpack.HeaderField, 0, len(fields)-1)
	kept := false
	for _, f := range fields {
		if f.Name == "content-type" {
			if kept || f.Value != ct {
				continue
			}
			kept = true
		}
		out = append(out, f)
	}
	return out
}

// loopHeader is the request header a proxy adds to the requests it
// relays, with its own hopID as the value, one field per proxy passed; a
// request that arrives with the proxy's own value maxLoopPasses times went
// round a forwarding loop (a backend that is the proxy itself, by a static
// address, a DNS name or a registry entry, or two proxies that are each
// other's backend). The call fails then instead of going round until some
// limit stops it: --max-backend-conns' 8,000 streams, or none. Like RFC
// 8586's CDN-Loop, each proxy adds its own token, so a chain of distinct
// proxies passes.
//
// Not every request carries it: see loopMark.
const loopHeader = "streamlb-via"

// loopSample is how many requests without a loopHeader field there are,
// on average, for each that a proxy marks (loopMark).
const loopSample = 16

// loopMark reports whether a request with fields gets this proxy's
// loopHeader field: always when it carries one already (any proxy's),
// else one request in loopSample, at random. A grpc-go backend pays for
// the field in every request that has it (its decoder appends each field
// to a slice, its server puts it in the call's metadata): 6% of a trivial
// backend's CPU per call where it made a grpc-go client's 8 fields 9
// (BENCHMARKS.md, "Session 27"). A loop needs no mark on every request to
// be found: each pass of a looping call is a new request to this proxy,
// marked with chance 1/loopSample, and from its first mark on every pass
// carries one, so every proxy in the loop adds its own on every pass and
// the call is refused maxLoopPasses passes later; about loopSample passes
// more than with every request marked, each a relay of a call that is
// held anyway, where an unmarked loop goes on until a limit stops it.
// The chance is drawn per request, not counted, so no interleaving of
// other calls can keep one loop from being marked.
func loopMark(fields []hpack.HeaderField) bool {
	for i := range fields {
		if fields[i].Name == loopHeader {
			return true
		}
	}
	return rand.Uint32N(loopSample) == 0
}

// maxLoopPasses is how many times a request may pass through one proxy
// before the next pass is taken for a loop. Not once: a service called
// through the proxy may call another through the same proxy (a central
// proxy in front of every service), and a framework that copies every
// incoming header onto its outgoing calls carries the first pass's token
// into the second; refused at once, that hairpin would fail as a loop. A
// real loop costs three relays, where it cost thousands.
const maxLoopPasses = 3

// hopIDUnless returns a new hop token (newHopID), or none when off: the
// proxy then adds no loopHeader and refuses no request as looped.
func hopIDUnless(off bool) string {
	if off {
		return ""
	}
	return newHopID()
}

// newHopID returns a random token naming one proxy in loopHeader.
func newHopID() string {
	var b [8]byte
	crand.Read(b[:]) // never fails (crypto/rand)
	return hex.EncodeToString(b[:])
}

// looped reports whether fields carry loopHeader with the value id
// maxLoopPasses times or more.
func looped(fields []hpack.HeaderField, id string) bool {
	n := 0
	for i := range fields {
		if fields[i].Name == loopHeader && fields[i].Value == id {
			n++
		}
	}
	return n >= maxLoopPasses
}

// maxInterimResponses bounds the informational (1xx) responses a backend
// may send before its final response headers, as x/net's HTTP/2 client
// does (5; http2.Transport, "too many 1xx informational responses").
const maxInterimResponses = 5

// responseStatus returns a response header block's :status, "" without
// one. A 1xx status is informational (RFC 9110 §15.2).
func responseStatus(fields []hpack.HeaderField) string {
	for i := range fields {
		if fields[i].Name == ":status" {
			return fields[i].Value
		}
	}
	return ""
}

// interimBlock reports whether fields are an informational (1xx)
// response header block, which the final response headers follow.
func interimBlock(fields []hpack.HeaderField) bool {
	return interimStatus(responseStatus(fields))
}

// interimStatus reports whether :status value s is informational (1xx).
func interimStatus(s string) bool { return len(s) == 3 && s[0] == '1' }

// validStatus reports whether a response's :status is three digits (RFC
// 9110 §15; x/net's client refuses one that is not a number).
func validStatus(s string) bool {
	if len(s) != 3 {
		return false
	}
	for i := range 3 {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// requestInfo is what the proxy reads from a request header block.
type requestInfo struct {
	method      string // :method
	path        string // :path, the gRPC full method name
	contentType string
	timeout     time.Duration // grpc-timeout; 0 when absent
	hasTimeout  bool
	// contentLength is the content-length the request declares, -1 when
	// it declares none: the sum of its DATA payloads must equal it (RFC
	// 9113 §8.1.1).
	contentLength int64
	// dropFields is set when the request carries a field that is not
	// relayed (http2-settings): the caller filters them (filterFields).
	dropFields bool
	// contentTypes counts the request's content-type fields; with more
	// than one, contentType is the one grpc-go's server would use, and
	// the only one relayed (oneContentType).
	contentTypes int
}

// malformedRequest is why a request header block is malformed in the
// sense of RFC 9113 §8.1.1: the request is not relayed (an intermediary
// must not forward it) and its stream ends with RST_STREAM(PROTOCOL_ERROR),
// as x/net's and grpc-go's servers end it. Other refusals (a method other
// than POST, a content-type not gRPC's, a malformed grpc-timeout) are
// well-formed HTTP and get a response with a gRPC status.
type malformedRequest string

func (m malformedRequest) Error() string { return "malformed request: " + string(m) }

// parseRequest checks a request header block as RFC 9113 §8.2.2 and
// §8.3.1 require and extracts what routing needs. The checks x/net's
// Framer makes (known pseudo-headers, each once, before the regular
// fields; lower-case names; valid values) are the header decoder's
// (headerblock.go). A malformed block returns a malformedRequest, which
// wins over a malformed grpc-timeout.
func parseRequest(fields []hpack.HeaderField) (requestInfo, error) {
	ri := requestInfo{contentLength: -1}
	var scheme, path bool
	var timeoutErr error
	for i := range fields {
		f := &fields[i]
		switch f.Name {
		case ":method":
			ri.method = f.Value
		case ":path":
			ri.path, path = f.Value, true
		case ":protocol":
			// RFC 8441 §3: extended CONNECT's pseudo-header is for a
			// server that sent SETTINGS_ENABLE_CONNECT_PROTOCOL; we
			// send none, so to us it is undefined (RFC 9113 §8.3), as
			// x/net's server finds it. grpc-go ignores pseudo-headers
			// it does not know: relayed, it passed.
			return ri, malformedRequest(":protocol without SETTINGS_ENABLE_CONNECT_PROTOCOL")
		case ":scheme":
			scheme = f.Value != ""
		case "content-type":
			// As grpc-go's server (operateHeaders): the request is gRPC
			// if any of its content-types is, the last gRPC one is the
			// one used, and without one the last is the one named in the
			// refusal.
			ri.contentTypes++
			if isGRPCContentType(f.Value) || !isGRPCContentType(ri.contentType) {
				ri.contentType = f.Value
			}
		case "grpc-timeout":
			d, err := parseTimeout(f.Value)
			if err != nil {
				timeoutErr = err
				continue
			}
			ri.timeout, ri.hasTimeout = d, true
		case "te":
			// §8.2.2: the one connection-specific field a request may
			// carry, and only with this value; an ABNF literal, matched
			// without regard to case (RFC 5234 §2.3), as grpc-go takes
			// "Trailers".
			if !strings.EqualFold(f.Value, "trailers") {
				return ri, malformedRequest(fmt.Sprintf("te %q: only \"trailers\" is allowed", f.Value))
			}
		case "content-length":
			n, err := strconv.ParseUint(f.Value, 10, 63)
			if err != nil || (ri.contentLength >= 0 && int64(n) != ri.contentLength) {
				return ri, malformedRequest(fmt.Sprintf("content-length %q", f.Value))
			}
			ri.contentLength = int64(n)
		case "http2-settings":
			// Connection-specific only when the Connection field names
			// it (RFC 9110 §7.6.1; h2c upgrade, which RFC 9113 dropped);
			// not among the fields §8.2.2 makes malformed, and grpc-go
			// takes it: not relayed, not refused.
			ri.dropFields = true
		default:
			if hopByHop(f.Name) {
				return ri, malformedRequest(fmt.Sprintf("connection-specific header field %q", f.Name))
			}
		}
	}
	switch {
	case ri.method == "":
		return ri, malformedRequest("missing :method")
	case ri.method == "CONNECT":
		// §8.5: no :scheme or :path; refused later as a method other
		// than POST.
		if scheme || path {
			return ri, malformedRequest("CONNECT with :scheme or :path")
		}
	case !scheme:
		return ri, malformedRequest("missing :scheme")
	case ri.path == "":
		return ri, malformedRequest("missing or empty :path")
	case ri.path[0] != '/' && (ri.path != "*" || ri.method != "OPTIONS"):
		// §8.3.1: an absolute path, or "*" for OPTIONS (RFC 9110
		// §7.1's asterisk-form), which x/net's validPseudoPath takes
		// with any method; relayed, grpc-go's answer (UNIMPLEMENTED)
		// hid that the proxy forwarded a malformed request.
		return ri, malformedRequest(":path is not an absolute path")
	}
	return ri, timeoutErr
}

// checkTrailerFields returns a malformedRequest if a request's trailer
// section carries a connection-specific field (RFC 9113 §8.2.2: any
// message with one is malformed, trailers too). The trailers' fields are
// not relayed (gRPC has no request trailers), but the request's end is: a
// malformed request must not be completed on the backend.
//
// A field value that starts or ends with SP or HTAB is malformed too
// (§8.2.1), in headers and trailers, but the proxy relays it as it is, as
// Envoy (which turned nghttp2's check off after it failed real clients,
// envoyproxy/envoy#23267), HAProxy, x/net's server and grpc-go do: a
// proxy stricter than the servers behind it breaks clients that work
// without it, and the value reaches the backend unchanged, so the two
// cannot disagree on it.
func checkTrailerFields(fields []hpack.HeaderField) error {
	for i := range fields {
		f := &fields[i]
		if f.Name != "http2-settings" && hopByHop(f.Name) {
			return malformedRequest(fmt.Sprintf("connection-specific trailer field %q", f.Name))
		}
	}
	return nil
}

// isGRPCContentType reports whether ct is application/grpc or
// application/grpc+codec / ;params, per the gRPC over HTTP/2 spec.
func isGRPCContentType(ct string) bool {
	const base = "application/grpc"
	if !strings.HasPrefix(ct, base) {
		return false
	}
	if len(ct) == len(base) {
		return true
	}
	switch ct[len(base)] {
	case '+', ';':
		return true
	}
	return false
}

// parseTimeout parses a grpc-timeout header value: at most 8 ASCII digits
// followed by one unit of H, M, S, m, u or n (gRPC over HTTP/2 spec).
// Values too large for a time.Duration saturate.
func parseTimeout(v string) (time.Duration, error) {
	if len(v) < 2 || len(v) > 9 {
		return 0, fmt.Errorf("proxy: malformed grpc-timeout %q", v)
	}
	var unit time.Duration
	switch v[len(v)-1] {
	case 'H':
		unit = time.Hour
	case 'M':
		unit = time.Minute
	case 'S':
		unit = time.Second
	case 'm':
		unit = time.Millisecond
	case 'u':
		unit = time.Microsecond
	case 'n':
		unit = time.Nanosecond
	default:
		return 0, fmt.Errorf("proxy: malformed grpc-timeout %q: unknown unit", v)
	}
	digits := v[:len(v)-1]
	for i := 0; i < len(digits); i++ {
		if digits[i] < '0' || digits[i] > '9' {
			return 0, fmt.Errorf("proxy: malformed grpc-timeout %q", v)
		}
	}
	n, err := strconv.ParseInt(digits, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("proxy: malformed grpc-timeout %q: %w", v, err)
	}
	const maxDur = time.Duration(1<<63 - 1)
	if n > int64(maxDur/unit) {
		return maxDur, nil
	}
	return time.Duration(n) * unit, nil
}

// formatTimeout is d as a grpc-timeout value, rounded down to the finest
// unit whose count fits the spec's 8 digits (as grpc-go's encodeTimeout,
// which rounds up): never more than d. Zero or less is "0n".
func formatTimeout(d time.Duration) string {
	if d <= 0 {
		return "0n"
	}
	units := [...]struct {
		d time.Duration
		c byte
	}{{time.Nanosecond, 'n'}, {time.Microsecond, 'u'}, {time.Millisecond, 'm'}, {time.Second, 'S'}, {time.Minute, 'M'}, {time.Hour, 'H'}}
	var b [9]byte
	for _, u := range units {
		if n := d / u.d; n < 1e8 {
			return string(append(strconv.AppendInt(b[:0], int64(n), 10), u.c))
		}
	}
	return "99999999H" // beyond time.Duration's range; unreachable
}

// encodeGRPCMessage percent-encodes a status message as the gRPC over
// HTTP/2 spec requires: bytes outside 0x20–0x7E, and '%', become %XX.
func encodeGRPCMessage(msg string) string {
	need := false
	for i := 0; i < len(msg); i++ {
		if c := msg[i]; c < ' ' || c > '~' || c == '%' {
			need = true
			break
		}
	}
	if !need {
		return msg
	}
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	b.Grow(len(msg) * 2)
	for i := 0; i < len(msg); i++ {
		c := msg[i]
		if c < ' ' || c > '~' || c == '%' {
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// grpcStatus returns the value of the grpc-status field of a response's
// final header block, and whether it has one. A block with the field more
// than once is relayed as it is, and grpc-go's client takes the last
// (http2_client.go operateHeaders overwrites the code field by field, as
// grpc-java's Metadata.get returns the last value): so does the proxy,
// which reports and retries the answer the client reads. Taking the
// first, a block with grpc-status 0 then 14 was reported OK while the
// client got UNAVAILABLE, and 14 then 0 was retried on a --retry-on
// method, run again, though the client would have read OK
// (TestAtk27DuplicateGRPCStatus).
func grpcStatus(fields []hpack.HeaderField) (string, bool) {
	for i := len(fields) - 1; i >= 0; i-- {
		if fields[i].Name == "grpc-status" {
			return fields[i].Value, true
		}
	}
	return "", false
}

// outcome derives the error reported to Picker.done from a response's
// final header block: nil for grpc-status 0. It reads the block as
// grpc-go's client does (http2_client.go operateHeaders), since the client
// reads these very trailers: a grpc-status that is not a 32-bit number,
// wherever it is, makes it malformed (UNKNOWN; Atoi's wider int made
// 4294967310 UNAVAILABLE (14) here, and a failure of the backend's, while
// the client saw UNKNOWN); then a -bin field that is not base64 fails it
// INTERNAL, whatever its grpc-status; then the last grpc-status counts
// (grpcStatus).
func outcome(fields []hpack.HeaderField) error {
	badBin := ""
	for i := range fields {
		f := &fields[i]
		switch {
		case f.Name == "grpc-status":
			if _, err := strconv.ParseInt(f.Value, 10, 32); err != nil {
				return status.Errorf(codes.Unknown, "malformed grpc-status %q", f.Value)
			}
		case badBin == "" && strings.HasSuffix(f.Name, "-bin") && !validBinValue(f.Value):
			badBin = f.Name
		}
	}
	if badBin != "" {
		// grpc-go's decodeMetadataHeader: the reserved names it skips
		// end in no -bin.
		return status.Errorf(codes.Internal, "malformed %s: not base64", badBin)
	}
	v, ok := grpcStatus(fields)
	switch {
	case !ok:
		return status.Error(codes.Unknown, "response without grpc-status")
	case v == "0":
		return nil
	}
	n, _ := strconv.ParseInt(v, 10, 32) // checked above
	return status.Error(codes.Code(uint32(n)), "backend returned status")
}

// validBinValue reports whether a binary (-bin) metadata value decodes as
// grpc-go's client decodes it (decodeBinHeader): padded base64 when its
// length is a multiple of 4, unpadded otherwise. A field value holds no
// CR or LF, which the decoder would skip.
func validBinValue(v string) bool {
	enc := base64.RawStdEncoding
	if len(v)%4 == 0 {
		enc = base64.StdEncoding
	}
	_, err := enc.DecodeString(v)
	return err == nil
}

// isUnavailable reports whether a final header block is UNAVAILABLE as
// the client reads it (outcome).
func isUnavailable(fields []hpack.HeaderField) bool {
	v, _ := grpcStatus(fields)
	return v == "14" && status.Code(outcome(fields)) == codes.Unavailable
}

// httpStatusCodes is grpc-go's HTTPStatusConvTab: the status its client
// reads from a response without a gRPC content-type, by :status; any
// other :status is UNKNOWN.
var httpStatusCodes = map[string]codes.Code{
	"400": codes.Internal,
	"401": codes.Unauthenticated,
	"403": codes.PermissionDenied,
	"404": codes.Unimplemented,
	"429": codes.Unavailable,
	"502": codes.Unavailable,
	"503": codes.Unavailable,
	"504": codes.Unavailable,
}

// nonGRPCCode reports whether fields, a response's final headers or its
// trailers-only block, name no gRPC content-type, and then the code a
// gRPC client reads from the response: grpc-go's (http2_client.go
// operateHeaders) comes from the :status alone, whatever grpc-status or
// trailers follow, as a 503 or 502 page of an HTTP proxy in front of the
// backend reads UNAVAILABLE. The proxy relays such a response as it is.
func nonGRPCCode(fields []hpack.HeaderField) (codes.Code, bool) {
	for i := range fields {
		if fields[i].Name == "content-type" && isGRPCContentType(fields[i].Value) {
			return codes.OK, false // grpc-go: any gRPC content-type makes it gRPC
		}
	}
	c, ok := httpStatusCodes[responseStatus(fields)]
	if !ok {
		c = codes.Unknown
	}
	return c, true
}

// nonGRPCOutcome is the outcome of a response whose final headers,
// fields, are not gRPC's (nonGRPCCode), nil for a gRPC response.
func nonGRPCOutcome(fields []hpack.HeaderField) error {
	c, ok := nonGRPCCode(fields)
	if !ok {
		return nil
	}
	return status.Errorf(c, "non-gRPC response: HTTP status %s", responseStatus(fields))
}

// errNoTrailers is the outcome of a gRPC response that ends without
// trailers (DATA with END_STREAM): grpc-go's client fails it INTERNAL.
var errNoTrailers = status.Error(codes.Internal, "server closed the stream without sending trailers")

// answerOutcome is outcome for a complete answer relayed at once: its
// header blocks in order (informational ones and nil skipped), the last
// ending the response.
func answerOutcome(answer [][]hpack.HeaderField) error {
	for _, b := range answer {
		if b == nil || interimBlock(b) {
			continue
		}
		if err := nonGRPCOutcome(b); err != nil {
			return err
		}
		break
	}
	return outcome(answer[len(answer)-1])
}

// answerUnavailable reports whether a backend's answer ending with fields,
// after the final headers held (nil: fields are a trailers-only block),
// is UNAVAILABLE as a gRPC client reads it. With fields nil, it reports
// whether held alone make it so (headers that are not gRPC's).
func answerUnavailable(held, fields []hpack.HeaderField) bool {
	first := held
	if first == nil {
		first = fields
	}
	if c, ok := nonGRPCCode(first); ok {
		return c == codes.Unavailable
	}
	return isUnavailable(fields)
}
