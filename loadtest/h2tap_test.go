package loadtest

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// event is what a recordingEvents saw, as a string for easy comparison.
type recordingEvents struct{ got []string }

func (r *recordingEvents) headers(id uint32, end bool, f *headerFields) {
	r.got = append(r.got, fmt.Sprintf("headers %d end=%v path=%q status=%q grpc=%q backend=%q", id, end, f.path, f.httpStatus, f.grpcStatus, f.backend))
}
func (r *recordingEvents) dataEnd(id uint32) { r.got = append(r.got, fmt.Sprintf("dataEnd %d", id)) }
func (r *recordingEvents) rstStream(id, code uint32) {
	r.got = append(r.got, fmt.Sprintf("rst %d code=%d", id, code))
}
func (r *recordingEvents) goAway(last uint32) { r.got = append(r.got, fmt.Sprintf("goaway %d", last)) }

// serverBytes builds a server-to-client byte stream with the framer and HPACK
// encoder grpc-go and the proxy use, covering what the tap must follow:
// dynamic-table references across blocks, a table size change, padding,
// priority, CONTINUATION, trailers-only responses, resets and GOAWAY.
func serverBytes(t testing.TB) []byte {
	t.Helper()
	var buf, hb bytes.Buffer
	fr := http2.NewFramer(&buf, nil)
	enc := hpack.NewEncoder(&hb)
	block := func(fields ...string) []byte {
		hb.Reset()
		for i := 0; i < len(fields); i += 2 {
			if err := enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]}); err != nil {
				t.Fatal(err)
			}
		}
		return bytes.Clone(hb.Bytes())
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(fr.WriteSettings())
	// Stream 1: headers, data, trailers.
	must(fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(":status", "200", "content-type", "application/grpc", "x-backend", "b1"), EndHeaders: true}))
	must(fr.WriteData(1, false, []byte("\x00\x00\x00\x00\x00")))
	must(fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block("grpc-status", "0"), EndHeaders: true, EndStream: true}))
	// Stream 3: the same header again, now from the dynamic table; padded
	// and with priority.
	must(fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block(":status", "200", "content-type", "application/grpc", "x-backend", "b1"), EndHeaders: true, PadLength: 7,
		Priority: http2.PriorityParam{StreamDep: 1, Weight: 10}}))
	// Stream 5: trailers-only, split over HEADERS and two CONTINUATIONs,
	// after a table size change.
	enc.SetMaxDynamicTableSizeLimit(256)
	enc.SetMaxDynamicTableSize(256)
	b := block(":status", "200", "grpc-status", "14", "x-backend", "b2", "grpc-message", "unavailable")
	must(fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 5, BlockFragment: b[:3], EndStream: true}))
	must(fr.WriteContinuation(5, false, b[3:7]))
	must(fr.WriteContinuation(5, true, b[7:]))
	// Stream 3 ends with DATA, without trailers.
	must(fr.WriteData(3, true, nil))
	must(fr.WriteRSTStream(7, http2.ErrCodeRefusedStream))
	must(fr.WritePing(false, [8]byte{}))
	must(fr.WriteGoAway(9, http2.ErrCodeNo, []byte("bye")))
	return buf.Bytes()
}

var wantServerEvents = []string{
	`headers 1 end=false path="" status="200" grpc="" backend="b1"`,
	`headers 1 end=true path="" status="" grpc="0" backend=""`,
	`headers 3 end=false path="" status="200" grpc="" backend="b1"`,
	`headers 5 end=true path="" status="200" grpc="14" backend="b2"`,
	`dataEnd 3`,
	`rst 7 code=7`,
	`goaway 9`,
}

// TestFrameReader feeds the same stream whole, byte by byte and in odd
// pieces: the events must not depend on how reads split the bytes.
func TestFrameReader(t *testing.T) {
	t.Parallel()
	data := serverBytes(t)
	for _, size := range []int{len(data), 1, 2, 7, 9, 10, 64} {
		t.Run(fmt.Sprintf("pieces of %d", size), func(t *testing.T) {
			t.Parallel()
			ev := &recordingEvents{}
			r := newFrameReader(false, "x-backend", ev)
			for p := data; len(p) > 0; {
				n := min(size, len(p))
				r.feed(p[:n])
				p = p[n:]
			}
			if r.err != nil {
				t.Fatalf("reader error: %v", r.err)
			}
			if diff := cmp.Diff(wantServerEvents, ev.got); diff != "" {
				t.Errorf("events (-want +got):\n%s", diff)
			}
		})
	}
}

// TestFrameReaderClient checks the client direction: the preface is
// skipped and request paths are read.
func TestFrameReaderClient(t *testing.T) {
	t.Parallel()
	var buf, hb bytes.Buffer
	buf.WriteString(clientPreface)
	fr := http2.NewFramer(&buf, nil)
	enc := hpack.NewEncoder(&hb)
	for _, id := range []uint32{1, 3} {
		hb.Reset()
		for _, f := range [][2]string{{":method", "POST"}, {":path", "/grpc.testing.TestService/EmptyCall"}, {"te", "trailers"}} {
			enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
		fr.WriteData(id, true, []byte{0, 0, 0, 0, 0})
	}
	fr.WriteRSTStream(3, http2.ErrCodeCancel)
	ev := &recordingEvents{}
	r := newFrameReader(true, "x-backend", ev)
	for _, b := range buf.Bytes() {
		r.feed([]byte{b})
	}
	want := []string{
		`headers 1 end=false path="/grpc.testing.TestService/EmptyCall" status="" grpc="" backend=""`,
		`dataEnd 1`,
		`headers 3 end=false path="/grpc.testing.TestService/EmptyCall" status="" grpc="" backend=""`,
		`dataEnd 3`,
		`rst 3 code=8`,
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	if diff := cmp.Diff(want, ev.got); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
}

func TestFrameReaderMalformed(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		client bool
		data   []byte
	}{
		{name: "bad preface", client: true, data: []byte("GET / HTTP/1.1\r\n\r\n...........")},
		{name: "continuation without headers", data: []byte{0, 0, 1, frameContinuation, flagEndHeaders, 0, 0, 0, 1, 0x82}},
		{name: "data inside a header block", data: []byte{0, 0, 1, frameHeaders, 0, 0, 0, 0, 1, 0x88, 0, 0, 0, frameData, 0, 0, 0, 0, 1}},
		{name: "padding longer than frame", data: []byte{0, 0, 2, frameHeaders, flagPadded | flagEndHeaders, 0, 0, 0, 1, 5, 0x88}},
		{name: "short rst", data: []byte{0, 0, 2, frameRSTStream, 0, 0, 0, 0, 1, 0, 8}},
		{name: "bad hpack index", data: []byte{0, 0, 1, frameHeaders, flagEndHeaders, 0, 0, 0, 1, 0xff}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := newFrameReader(tc.client, "x-backend", &recordingEvents{})
			r.feed(tc.data)
			if r.err == nil {
				t.Errorf("no error for %s", tc.name)
			}
			// Once failed, the reader ignores input instead of failing again.
			r.feed(tc.data)
		})
	}
}

// FuzzFrameReader feeds arbitrary bytes, split at an arbitrary point: the
// reader may give up but must not panic, and splitting must not change what
// it reports.
func FuzzFrameReader(f *testing.F) {
	f.Add(serverBytes(f), 5)
	f.Add([]byte{0, 0, 1, frameHeaders, flagEndHeaders, 0, 0, 0, 1, 0x88}, 3)
	f.Add([]byte{0, 0, 4, frameRSTStream, 0, 0, 0, 0, 1, 0, 0, 0, 8}, 0)
	f.Fuzz(func(t *testing.T, data []byte, split int) {
		whole := &recordingEvents{}
		r := newFrameReader(false, "x-backend", whole)
		r.feed(data)
		parts := &recordingEvents{}
		r2 := newFrameReader(false, "x-backend", parts)
		if len(data) > 0 {
			split = ((split % len(data)) + len(data)) % len(data)
		} else {
			split = 0
		}
		r2.feed(data[:split])
		r2.feed(data[split:])
		if (r.err == nil) != (r2.err == nil) {
			t.Fatalf("whole: err %v; split at %d: err %v", r.err, split, r2.err)
		}
		if diff := cmp.Diff(whole.got, parts.got); diff != "" {
			t.Fatalf("events differ when split at %d (-whole +split):\n%s", split, diff)
		}
	})
}
