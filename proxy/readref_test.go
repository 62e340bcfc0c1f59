package proxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"testing"
)

// TestConnReaderViews reads records (a 4-byte length, then that many
// bytes) from a TCP socket written in random pieces, with fillTo as the
// frame loop does, and takes every large record as a view of the read
// buffer. Some views are kept to the end, the others freed a few records
// later. A buffer filled again while a view of it lived would change what
// the view holds: every view must hold its record at the end. The buffers
// with views stay within maxPinnedReadBufs (a view is refused, and the
// record copied, at the limit), and all are back once the views are freed.
//
// Not parallel: the process-wide bound (maxPinnedReadBufsTotal) is shared
// with the other tests' backend connections.
func TestConnReaderViews(t *testing.T) {
	client, server := tcpPair(t)
	r := newConnReader(server)
	rng := rand.New(rand.NewPCG(5, 6))
	var records [][]byte
	var stream []byte
	for range 400 {
		n := rng.IntN(maxFrameSize + 1)
		if rng.IntN(4) == 0 {
			n = rng.IntN(100) // small ones between, as frame headers go
		}
		rec := make([]byte, n)
		for i := range rec {
			rec[i] = byte(rng.IntN(256))
		}
		records = append(records, rec)
		stream = binary.BigEndian.AppendUint32(stream, uint32(n))
		stream = append(stream, rec...)
	}
	done := make(chan error, 1)
	go func() {
		wr := rand.New(rand.NewPCG(7, 8))
		rest := stream
		for len(rest) > 0 {
			k := min(len(rest), 1+wr.IntN(50_000))
			if _, err := client.Write(rest[:k]); err != nil {
				done <- err
				return
			}
			rest = rest[k:]
		}
		done <- client.Close()
	}()

	type kept struct {
		v    *pbuf
		want []byte
	}
	var keep, recent []kept
	views, refused := 0, 0
	for i, want := range records {
		if !r.fillTo(4) {
			t.Fatalf("record %d: no length: %v", i, r.err)
		}
		n := int(binary.BigEndian.Uint32(r.buffered()))
		r.discard(4)
		if n == 0 {
			continue
		}
		if !r.fillTo(n) {
			t.Fatalf("record %d: %d bytes not read: %v", i, n, r.err)
		}
		p := r.buffered()[:n]
		if !bytes.Equal(p, want) {
			t.Fatalf("record %d read wrong", i)
		}
		if n >= vecMin {
			v := r.view(p)
			if v == nil {
				refused++
				if got, all := r.pinnedBufs(), pinnedReadBufs.Load(); got < maxPinnedReadBufs && all < maxPinnedReadBufsTotal {
					t.Fatalf("record %d: view refused with %d buffers pinned (%d in the process), under the limits %d and %d", i, got, all, maxPinnedReadBufs, maxPinnedReadBufsTotal)
				}
			} else {
				views++
				if len(v.b) != n || cap(v.b) != n {
					t.Fatalf("view of %d bytes has len %d cap %d", n, len(v.b), cap(v.b))
				}
				k := kept{v, want}
				if rng.IntN(8) == 0 {
					keep = append(keep, k)
				} else {
					recent = append(recent, k)
				}
			}
		}
		r.discard(n)
		if got := r.pinnedBufs(); got > maxPinnedReadBufs {
			t.Fatalf("record %d: %d read buffers pinned, over %d", i, got, maxPinnedReadBufs)
		}
		for len(recent) > 3 {
			if !bytes.Equal(recent[0].v.b, recent[0].want) {
				t.Fatalf("a view changed before it was freed (record %d)", i)
			}
			putBuf(recent[0].v)
			recent = recent[1:]
		}
	}
	if _, err := r.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("after the last record: %v, want EOF", err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if views == 0 || refused == 0 {
		t.Errorf("%d views made, %d refused: the test should see both", views, refused)
	}
	for _, k := range append(keep, recent...) {
		if !bytes.Equal(k.v.b, k.want) {
			t.Fatal("a view changed before it was freed")
		}
		putBuf(k.v)
	}
	if got := r.pinnedBufs(); got != 0 {
		t.Errorf("%d read buffers still pinned after every view was freed", got)
	}
}

// TestFillToKeepsErrorForRead: the end of the stream in the middle of what
// fillTo waits for leaves the bytes that came readable, and Read returns
// the end after them, as it does after any fill.
func TestFillToKeepsErrorForRead(t *testing.T) {
	t.Parallel()
	client, server := tcpPair(t)
	r := newConnReader(server)
	if _, err := client.Write([]byte("partial")); err != nil {
		t.Fatal(err)
	}
	client.Close()
	if r.fillTo(100) {
		t.Fatal("fillTo(100) reported 100 bytes of a 7-byte stream")
	}
	got, err := io.ReadAll(r)
	if string(got) != "partial" || err != nil {
		t.Errorf("after fillTo: read %q, %v; want \"partial\" then EOF", got, err)
	}
}

// TestHoldTarget: with the window target holdTarget(n), a message of n
// bytes arrives whole while none of it is returned, even with
// target/creditDiv of credited bytes not yet returned; one less and it
// might not. And the default ResponseHoldback shrinks to what
// BackendMaxStreamWindow lets arrive whole, while a larger one asked for
// is an error.
func TestHoldTarget(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(9, 10))
	for range 100_000 {
		n := 1 + rng.Int64N(1<<24)
		w := holdTarget(n)
		if w-w/creditDiv < n {
			t.Fatalf("holdTarget(%d) = %d leaves %d for the message", n, w, w-w/creditDiv)
		}
		if w--; w-w/creditDiv >= n+1 {
			t.Fatalf("holdTarget(%d) is not the least: %d would do", n, w)
		}
	}
	for _, tc := range []struct {
		window, hold int
		want         int
		err          bool
	}{
		{window: DefaultBackendMaxStreamWindow, want: DefaultResponseHoldback},
		{window: 128 << 10, want: int(((128<<10)-1)*(creditDiv-1)/creditDiv) - 5},
		{window: 128 << 10, hold: DefaultResponseHoldback, err: true},
		{window: 128 << 10, hold: -1, want: 0},
	} {
		c := Config{BackendStreamWindow: 16 << 10, BackendMaxStreamWindow: int32(tc.window), ResponseHoldback: tc.hold, Picker: PickerFunc(nil)}
		err := c.setDefaults()
		if tc.err {
			if err == nil {
				t.Errorf("window %d, hold-back %d: no error", tc.window, tc.hold)
			}
			continue
		}
		if err != nil || c.ResponseHoldback != tc.want {
			t.Errorf("window %d, hold-back %d: got %d, %v; want %d", tc.window, tc.hold, c.ResponseHoldback, err, tc.want)
		}
		if h := c.ResponseHoldback; h > 0 && holdTarget(int64(h)+5) > int64(tc.window) {
			t.Errorf("window %d: default hold-back %d cannot arrive whole", tc.window, h)
		}
	}
}

// TestConnReaderViewSurvivesRefill: a view of a drained buffer outlives the
// reader's next fill, by fillTo or by Read (the Framer's way): the fill
// goes into another buffer.
func TestConnReaderViewSurvivesRefill(t *testing.T) {
	t.Parallel()
	for _, viaRead := range []bool{false, true} {
		client, server := tcpPair(t)
		r := newConnReader(server)
		first := bytes.Repeat([]byte{'a'}, 8000)
		if _, err := client.Write(first); err != nil {
			t.Fatal(err)
		}
		if !r.fillTo(len(first)) {
			t.Fatal(r.err)
		}
		v := r.view(r.buffered()[:len(first)])
		if v == nil {
			t.Fatal("no view of a plain socket's buffer")
		}
		r.discard(len(first)) // drained: the next fill starts a buffer
		if _, err := client.Write(bytes.Repeat([]byte{'b'}, 8000)); err != nil {
			t.Fatal(err)
		}
		if viaRead {
			if _, err := io.ReadFull(r, make([]byte, 8000)); err != nil {
				t.Fatal(err)
			}
		} else if !r.fillTo(8000) {
			t.Fatal(r.err)
		}
		if !bytes.Equal(v.b, first) {
			t.Errorf("fill by Read %v: the view's bytes changed", viaRead)
		}
		putBuf(v)
		if viaRead && r.pinnedBufs() != 0 {
			t.Errorf("%d buffers pinned after the view was freed", r.pinnedBufs())
		}
	}
}

// TestFillToCompletesFrameInSlack: records the size of a full DATA frame
// with its header (16,393 bytes), all queued before the first read, come
// four to a read buffer: the fourth, which the end of the first full 64
// KiB read cuts, is completed in the buffer's slack, so its view shares the
// buffer of the three before it, and eight records take two buffers.
// Before the slack, the part of it read was copied to the front of a fresh
// buffer, and so was a frame of almost every full read after it: three
// buffers here, and a fifth of a streamed answer's bytes copied.
//
// Not parallel: views count in the process-wide bound
// (maxPinnedReadBufsTotal).
func TestFillToCompletesFrameInSlack(t *testing.T) {
	const n = maxFrameSize + frameHeaderLen - 4 // with its 4-byte length, a full frame
	// The fifth length through Read: the fourth record left the bytes
	// after it in the next buffer.
	views := readRecords(t, []int{n, n, n, n, n, n, n, n}, 0)
	bufs := map[*readBuf]bool{}
	for _, v := range views {
		bufs[v.rb] = true
	}
	if views[3].rb != views[0].rb {
		t.Error("the record cut by the end of the first 64 KiB read went to another buffer: its start was copied")
	}
	if len(bufs) != 2 {
		t.Errorf("8 records of %d bytes took %d read buffers, want 2", 4+n, len(bufs))
	}
}

// TestFillToLengthCutAtBufferEnd: a record whose length field the end of
// the first 64 KiB read cuts (as a frame header can be) is completed in
// the slack, the fill going on into the next buffer with the record's
// bytes; the record is then taken from there, and every record reads and
// stays as written. The first version of the readv fill read the socket
// again into the next buffer, over those bytes.
func TestFillToLengthCutAtBufferEnd(t *testing.T) {
	// 3 x 16,388 bytes, then a record ending 2 bytes before 64 KiB: the
	// fifth one's length straddles it.
	const full = maxFrameSize
	last := connBufSize - 2 - 3*(4+full) - 4
	readRecords(t, []int{full, full, full, last, 16000, full, full, 100, full, full}, 1)
}

// readRecords writes records of the sizes given (a 4-byte length, then
// that many bytes of 'a'+i) at once to a unix socket, reads them with a
// connReader as the frame loop does, the lengths of records i with i%2 ==
// viaRead through Read as the Framer reads, the others with fillTo, takes
// each record as a view, and checks every view still holds its record at
// the end. It returns the views, freed when the test ends.
func readRecords(t *testing.T, sizes []int, viaRead int) []*pbuf {
	t.Helper()
	client, server := unixPair(t)

	record := func(i int) []byte { return bytes.Repeat([]byte{byte('a' + i)}, sizes[i]) }
	var stream []byte
	for i, n := range sizes {
		stream = binary.BigEndian.AppendUint32(stream, uint32(n))
		stream = append(stream, record(i)...)
	}
	// A unix stream socket queues what is written at the receiver at
	// once: every record is there for the first read.
	if _, err := client.Write(stream); err != nil {
		t.Fatal(err)
	}

	r := newConnReader(server)
	var views []*pbuf
	t.Cleanup(func() {
		// The views and the reader let go of their buffers: the
		// process-wide count of pinned buffers, which other tests
		// read, comes back.
		for _, v := range views {
			putBuf(v)
		}
		r.release()
		if got := r.pinnedBufs(); got != 0 {
			t.Errorf("%d read buffers still pinned after the views and the reader let go", got)
		}
	})
	for i, n := range sizes {
		// Through fillTo, the length stays unread until the record is
		// taken, as a frame's header does (nextBuffered).
		var l [4]byte
		head := 0
		if i%2 == viaRead {
			if _, err := io.ReadFull(r, l[:]); err != nil {
				t.Fatalf("record %d: no length: %v", i, err)
			}
		} else {
			if !r.fillTo(4) {
				t.Fatalf("record %d: no length: %v", i, r.err)
			}
			copy(l[:], r.buffered())
			head = 4
		}
		if got := binary.BigEndian.Uint32(l[:]); got != uint32(n) {
			t.Fatalf("record %d: length %d, want %d", i, got, n)
		}
		if !r.fillTo(head + n) {
			t.Fatalf("record %d: %d bytes not read: %v", i, n, r.err)
		}
		p := r.buffered()[head : head+n]
		if !bytes.Equal(p, record(i)) {
			t.Fatalf("record %d read wrong", i)
		}
		v := r.view(p)
		if v == nil {
			t.Fatalf("record %d: no view (%d buffers pinned)", i, r.pinnedBufs())
		}
		views = append(views, v)
		r.discard(head + n)
	}
	for i, v := range views {
		if !bytes.Equal(v.b, record(i)) {
			t.Fatalf("view %d changed", i)
		}
	}
	return views
}

// TestSlackFillParkedHoldsOneBuffer: a fill of the slack (the rest of a
// frame the end of a 64 KiB read cut) that finds the socket empty parks
// holding the buffer with the frame's start only: the next buffer its
// readv would go on into is let go until bytes come, so a backend that
// stalls there costs the connection one pooled buffer, not two (it kept
// both, 160 KiB; found by a helper's review).
func TestSlackFillParkedHoldsOneBuffer(t *testing.T) {
	_, server := unixPair(t)
	c := newConnReader(server)
	if c.raw == nil {
		t.Skip("no raw reads on this platform")
	}
	// As fillTo leaves it for a frame whose first 100 bytes end the
	// buffer: the fill goes in the slack, up to the frame's end, and on
	// into next.
	c.big = readBufPool.Get().(*[]byte)
	c.buf, c.r, c.w = *c.big, connBufSize-100, connBufSize
	c.fillAt, c.fillEnd = c.w, c.r+1000
	var parked bool
	if err := c.raw.Control(func(fd uintptr) { parked = !c.fillRaw(fd) }); err != nil {
		t.Fatal(err)
	}
	if !parked {
		t.Fatal("the fill read from an empty socket")
	}
	if c.next != nil {
		t.Error("parked with the next buffer held beside the frame's")
	}
	if c.big == nil {
		t.Error("parked without the buffer that holds the frame's start")
	}
	c.fillAt, c.fillEnd = 0, 0
	c.r = c.w
	c.release()
}

// unixPair returns the two ends of a unix stream socket, closed when the
// test ends; it skips the test where there are none.
func unixPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Skipf("no unix sockets: %v", err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { server.Close() })
	return client, server
}
