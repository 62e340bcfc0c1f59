package proxy

import (
	"bytes"
	"testing"

	"golang.org/x/net/http2"
)

// TestDataFrameHeader: the DATA frames the writer writes by hand are the
// bytes x/net's Framer writes for the same frame.
func TestDataFrameHeader(t *testing.T) {
	for _, tc := range []struct {
		id   uint32
		end  bool
		size int
	}{
		{1, false, 0},
		{1, true, 0},
		{3, false, 100},
		{2147483647, true, 5},
		{1 << 20, false, 16 << 10},
		{7, true, 1<<24 - 1},
	} {
		data := bytes.Repeat([]byte{0xa5}, tc.size)
		var want bytes.Buffer
		if err := http2.NewFramer(&want, nil).WriteData(tc.id, tc.end, data); err != nil {
			t.Fatal(err)
		}
		var h [9]byte
		dataFrameHeader(&h, tc.id, tc.end, len(data))
		got := append(h[:], data...)
		if !bytes.Equal(got, want.Bytes()) {
			t.Errorf("id %d end %v size %d: header % x, Framer wrote % x", tc.id, tc.end, tc.size, got[:9], want.Bytes()[:9])
		}
		// And the Framer reads it back as that frame.
		fr := http2.NewFramer(nil, bytes.NewReader(got))
		fr.SetMaxReadFrameSize(1<<24 - 1)
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("id %d: reading it back: %v", tc.id, err)
		}
		df, ok := f.(*http2.DataFrame)
		if !ok || df.StreamID != tc.id || df.StreamEnded() != tc.end || len(df.Data()) != tc.size {
			t.Errorf("id %d end %v size %d: read back %v", tc.id, tc.end, tc.size, f)
		}
	}
}
