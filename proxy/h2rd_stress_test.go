package proxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// Differential stress test of connReader as the frame loop drives it
// (nextBuffered, bufferedFrame, the Framer's reads through Read): a writer
// sends HTTP/2-shaped records (a 9-byte header with a 24-bit length) in
// random pieces with random pauses over a real socket, and the reader
// checks every byte against what was sent, takes large DATA payloads as
// views which another goroutine checks and frees later (as the writer that
// relays them does), and checks at the end that every view still held its
// bytes and the pinned counts came back.

// h2rdPair returns the two ends of a connected unix or TCP loopback socket.
func h2rdPair(t testing.TB, network string) (wr, rd net.Conn) {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "s")
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Skipf("no %s sockets: %v", network, err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	wr, err = net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	rd = <-accepted
	if rd == nil {
		wr.Close()
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { wr.Close(); rd.Close() })
	return wr, rd
}

// h2rdLengths is the length distribution: the sizes around the slack's
// arithmetic, and lengths chosen so that the record after this one starts
// at, or a byte or so around, a multiple of connBufSize (and of
// connBufSize+readSlack) of the stream, where a reader that read all it
// could since its last empty buffer cuts.
func h2rdLength(rng *rand.Rand, off int) int {
	special := []int{0, 1, 8, 9, 16, 100, vecMin - 1, vecMin, maxFrameSize, maxFrameSize - 36, 8192, 12000}
	switch k := rng.IntN(16); {
	case k < 4:
		return special[rng.IntN(len(special))]
	case k < 8:
		return maxFrameSize - 9 + rng.IntN(19) - 9 + 9 // 16375..16393, some over maxFrameSize
	case k < 11:
		// The next record's header at (or d around) a buffer's end.
		unit := connBufSize
		if rng.IntN(3) == 0 {
			unit = connBufSize + readSlack
		}
		d := rng.IntN(21) - 10
		next := (off/unit+1)*unit + d
		n := next - off - frameHeaderLen
		for n > maxFrameSize {
			n -= unit / 4
		}
		if n < 0 {
			n = -n % maxFrameSize
		}
		return n
	case k < 13:
		return rng.IntN(maxFrameSize + 1)
	default:
		return rng.IntN(64)
	}
}

type h2rdFrame struct {
	off, n int
	typ    byte
}

// h2rdStream builds a stream of records with random payload bytes.
func h2rdStream(rng *rand.Rand, total int) ([]byte, []h2rdFrame) {
	var s []byte
	var frames []h2rdFrame
	for len(s) < total {
		n := h2rdLength(rng, len(s))
		typ := byte(0) // DATA
		if rng.IntN(4) == 0 {
			typ = []byte{1, 3, 6, 8, 9}[rng.IntN(5)]
		}
		frames = append(frames, h2rdFrame{off: len(s), n: n, typ: typ})
		s = append(s, byte(n>>16), byte(n>>8), byte(n), typ, byte(rng.IntN(256)))
		s = binary.BigEndian.AppendUint32(s, rng.Uint32()&(1<<31-1))
		start := len(s)
		s = append(s, make([]byte, n)...)
		for i := start; i < len(s); i += 8 {
			var w [8]byte
			binary.LittleEndian.PutUint64(w[:], rng.Uint64())
			copy(s[i:], w[:])
		}
	}
	return s, frames
}

// h2rdWrite writes s to c in random pieces with random short pauses, then
// closes c's writing side.
func h2rdWrite(c net.Conn, s []byte, seed uint64, pauses bool) error {
	rng := rand.New(rand.NewPCG(seed, 77))
	for len(s) > 0 {
		var k int
		switch rng.IntN(6) {
		case 0:
			k = 1 + rng.IntN(16)
		case 1:
			k = 1 + rng.IntN(600)
		case 2:
			k = 1 + rng.IntN(20000)
		case 3:
			k = connBufSize - 10 + rng.IntN(20)
		default:
			k = 1 + rng.IntN(200000)
		}
		k = min(k, len(s))
		if _, err := c.Write(s[:k]); err != nil {
			return err
		}
		s = s[k:]
		if pauses && rng.IntN(8) == 0 {
			time.Sleep(time.Duration(rng.IntN(300)) * time.Microsecond)
		}
	}
	switch cw := c.(type) {
	case *net.UnixConn:
		return cw.CloseWrite()
	case *net.TCPConn:
		return cw.CloseWrite()
	}
	return c.Close()
}

// h2rdStats counts what the reads went through, to see that the stress
// reaches the slack: states with bytes in the slack, with bytes pending in
// next, and with some of them moved to the slack.
var h2rdStats struct{ slack, next, nextMoved, records, views, framer, unreached int }

type h2rdView struct {
	v    *pbuf
	want []byte
	at   int // the record's offset
}

// h2rdCheckState checks connReader's invariants between two steps.
func h2rdCheckState(c *connReader, live map[*readBuf]bool) error {
	if c.r > c.w {
		return fmt.Errorf("r %d > w %d", c.r, c.w)
	}
	if c.r < c.w && c.w > len(c.buf) {
		return fmt.Errorf("w %d beyond buf %d", c.w, len(c.buf))
	}
	if c.nextW > 0 && (c.next == nil || c.nextR >= c.nextW) {
		return fmt.Errorf("next [%d,%d) pending, next %p", c.nextR, c.nextW, c.next)
	}
	if c.next != nil && c.big != nil && c.next == c.big {
		return errors.New("next is the current buffer")
	}
	if c.shared != nil && c.shared.buf != c.big {
		return errors.New("shared is not the current buffer")
	}
	for rb := range live {
		if rb == c.shared {
			continue
		}
		if rb.buf == c.big || rb.buf == c.next {
			return errors.New("a buffer with live views is the reader's again")
		}
	}
	return nil
}

// h2rdRead reads the stream as the frame loop does and checks every byte.
// It returns how many records it read and views it made.
func h2rdRead(t *testing.T, c *connReader, rc net.Conn, s []byte, frames []h2rdFrame, seed uint64, deadlines bool) (int, int) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 99))
	views := make(chan h2rdView, 64)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var viewErr error
	live := map[*readBuf]int{}
	wg.Add(1)
	go func() {
		// The relaying writer: checks each view, sometimes after a
		// while, and frees it.
		defer wg.Done()
		var held []h2rdView
		hr := rand.New(rand.NewPCG(seed, 5))
		check := func(v h2rdView) {
			if !bytes.Equal(v.v.b, v.want) {
				mu.Lock()
				if viewErr == nil {
					i := 0
					for i < len(v.want) && v.v.b[i] == v.want[i] {
						i++
					}
					viewErr = fmt.Errorf("view of the record at %d (%d bytes) changed at byte %d", v.at, len(v.want), i)
				}
				mu.Unlock()
			}
			mu.Lock()
			if live[v.v.rb]--; live[v.v.rb] == 0 {
				delete(live, v.v.rb)
			}
			mu.Unlock()
			putBuf(v.v)
		}
		for v := range views {
			held = append(held, v)
			for len(held) > 0 && (len(held) > 6 || hr.IntN(3) == 0) {
				i := 0
				if hr.IntN(4) == 0 {
					i = hr.IntN(len(held))
				}
				check(held[i])
				held = append(held[:i], held[i+1:]...)
			}
			if hr.IntN(10) == 0 {
				time.Sleep(time.Duration(hr.IntN(200)) * time.Microsecond)
			}
		}
		for _, v := range held {
			check(v)
		}
	}()
	defer func() {
		close(views)
		wg.Wait()
		if viewErr != nil {
			t.Error(viewErr)
		}
	}()

	timeout := func(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }
	setDeadline := func() {
		if deadlines && rng.IntN(4) == 0 {
			rc.SetReadDeadline(time.Now().Add(time.Duration(rng.IntN(300)) * time.Microsecond))
		}
	}
	// readFull is the Framer's io.ReadFull, going on after a deadline.
	readFull := func(p []byte) error {
		n := 0
		for tries := 0; n < len(p); tries++ {
			k, err := c.Read(p[n:])
			n += k
			if err != nil {
				if timeout(err) && tries < 100000 {
					rc.SetReadDeadline(time.Time{})
					continue
				}
				if n > 0 && err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return err
			}
		}
		return nil
	}
	stateErr := func(where string, i int) bool {
		if c.w > connBufSize {
			h2rdStats.slack++
		}
		if c.nextW > 0 {
			h2rdStats.next++
			if c.nextR > 0 {
				h2rdStats.nextMoved++
			}
		}
		mu.Lock()
		lv := map[*readBuf]bool{}
		for rb := range live {
			lv[rb] = true
		}
		mu.Unlock()
		if err := h2rdCheckState(c, lv); err != nil {
			t.Errorf("record %d at %d, %s: %v (r %d w %d next [%d,%d))", i, frames[i].off, where, err, c.r, c.w, c.nextR, c.nextW)
			return true
		}
		return false
	}

	nviews := 0
	start := time.Now()
	payload := make([]byte, maxFrameSize+64)
	for i, f := range frames {
		if time.Since(start) > 20*time.Second {
			t.Fatalf("too slow: record %d of %d", i, len(frames))
		}
		want := s[f.off : f.off+frameHeaderLen+f.n]
		setDeadline()
		b := c.buffered()
		if len(b) < frameHeaderLen {
			for tries := 0; !c.fillTo(frameHeaderLen); tries++ {
				if timeout(c.err) && tries < 100000 {
					// The frame loop would end here; the test takes the
					// error (Read returns it once the buffer is drained,
					// so only when nothing is buffered) and goes on.
					if len(c.buffered()) == 0 {
						if _, err := c.Read(payload[:1]); !timeout(err) {
							t.Fatalf("record %d: Read after a fill's deadline: %v", i, err)
						}
						rc.SetReadDeadline(time.Time{})
						continue
					}
				}
				break
			}
			if stateErr("after fillTo(header)", i) {
				return i, nviews
			}
			b = c.buffered()
		}
		took := false
		if len(b) >= frameHeaderLen {
			if !bytes.Equal(b[:frameHeaderLen], want[:frameHeaderLen]) {
				t.Fatalf("record %d at %d: header % x, want % x", i, f.off, b[:frameHeaderLen], want[:frameHeaderLen])
			}
			n := int(b[0])<<16 | int(b[1])<<8 | int(b[2])
			if len(b) < frameHeaderLen+n && b[3] == 0 && n >= vecMin && n <= maxFrameSize {
				if c.fillTo(frameHeaderLen + n) {
					b = c.buffered()
				} else if c.err == nil {
					h2rdStats.unreached++ // fillTo's "not reached" returns
				}
				if stateErr("after fillTo(frame)", i) {
					return i, nviews
				}
			}
			if n <= maxFrameSize && len(b) >= frameHeaderLen+n {
				took = true
				if !bytes.Equal(b[:frameHeaderLen+n], want) {
					j := 0
					for b[j] == want[j] {
						j++
					}
					t.Fatalf("record %d at %d (%d bytes): byte %d differs in the buffer", i, f.off, n, j)
				}
				p := b[frameHeaderLen : frameHeaderLen+n]
				if b[3] == 0 && n >= vecMin && rng.IntN(5) != 0 {
					if v := c.view(p); v != nil {
						nviews++
						mu.Lock()
						live[v.rb]++
						mu.Unlock()
						views <- h2rdView{v: v, want: want[frameHeaderLen:], at: f.off}
					}
				}
				c.discard(frameHeaderLen + n)
			}
		}
		if !took {
			h2rdStats.framer++
			// The Framer: the header, then the payload, through Read.
			var h [frameHeaderLen]byte
			if err := readFull(h[:]); err != nil {
				t.Fatalf("record %d at %d of %d: header: %v (read %d bytes before)", i, f.off, len(s), err, f.off)
			}
			if !bytes.Equal(h[:], want[:frameHeaderLen]) {
				t.Fatalf("record %d at %d: header % x through Read, want % x", i, f.off, h, want[:frameHeaderLen])
			}
			if err := readFull(payload[:f.n]); err != nil {
				t.Fatalf("record %d at %d: payload of %d: %v", i, f.off, f.n, err)
			}
			if !bytes.Equal(payload[:f.n], want[frameHeaderLen:]) {
				t.Fatalf("record %d at %d (%d bytes): payload through Read differs", i, f.off, f.n)
			}
		}
		if stateErr("after the record", i) {
			return i, nviews
		}
	}
	rc.SetReadDeadline(time.Time{})
	// All records read: what follows is the tail of a record the stream
	// was cut in (truncate), then EOF, and nothing more. The frame loop
	// tries to fill a header, and a large DATA frame's rest, first.
	end := 0
	if len(frames) > 0 {
		f := frames[len(frames)-1]
		end = f.off + frameHeaderLen + f.n
	}
	tail := s[end:]
	if c.fillTo(frameHeaderLen) {
		if len(tail) < frameHeaderLen {
			t.Fatalf("fillTo at the end: %d bytes, %d sent", len(c.buffered()), len(tail))
		}
		b := c.buffered()
		if n := int(b[0])<<16 | int(b[1])<<8 | int(b[2]); b[3] == 0 && n >= vecMin && n <= maxFrameSize && c.fillTo(frameHeaderLen+n) {
			t.Fatalf("fillTo completed a record the stream cut (%d of %d bytes sent)", len(tail), frameHeaderLen+n)
		}
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("Read at the end: %v, want EOF", err)
	}
	if !bytes.Equal(got, tail) {
		t.Fatalf("Read at the end: %d bytes, want the %d sent", len(got), len(tail))
	}
	var one [1]byte
	if n, err := c.Read(one[:]); n != 0 || err == nil {
		t.Fatalf("Read after EOF: %d, %v", n, err)
	}
	return len(frames), nviews
}

// TestH2rdReaderStress is the differential stress test; H2RD_ITER sets how
// many streams of each kind it reads (default a few, about 2 s).
func TestH2rdReaderStress(t *testing.T) {
	iters, seed0 := h2rdKnobs()
	// Process-wide: other tests' connections still closing may free theirs
	// meanwhile; only a rise is this test's.
	base := pinnedReadBufs.Load()
	for it := 0; it < iters; it++ {
		for _, mode := range []struct {
			network           string
			pauses, deadlines bool
			atOnce, truncate  bool
		}{
			{"unix", false, false, true, false},
			{"unix", false, false, true, true},
			{"unix", true, false, false, true},
			{"tcp", false, false, false, true},
			{"unix", true, false, false, false},
			{"tcp", true, false, false, false},
			{"tcp", false, true, false, false},
			{"unix", true, true, false, false},
		} {
			seed := seed0 + uint64(it)*1000003
			name := fmt.Sprintf("%s/pauses=%v/deadlines=%v/atOnce=%v/truncate=%v/seed=%d", mode.network, mode.pauses, mode.deadlines, mode.atOnce, mode.truncate, seed)
			ok := t.Run(name, func(t *testing.T) {
				wc, rc := h2rdPair(t, mode.network)
				rng := rand.New(rand.NewPCG(seed, 1))
				total := 1<<20 + rng.IntN(1<<20)
				if mode.atOnce {
					total = 150 << 10 // within the socket's buffer
					if uc, ok := wc.(*net.UnixConn); ok {
						uc.SetWriteBuffer(1 << 20)
					}
				}
				s, frames := h2rdStream(rng, total)
				if mode.truncate {
					// Cut within the last records, often in a header.
					f := frames[len(frames)-1-rng.IntN(min(3, len(frames)))]
					cut := f.off + rng.IntN(frameHeaderLen+f.n+1)
					if rng.IntN(2) == 0 {
						cut = f.off + rng.IntN(frameHeaderLen+1)
					}
					s = s[:cut]
					for len(frames) > 0 && frames[len(frames)-1].off+frameHeaderLen+frames[len(frames)-1].n > cut {
						frames = frames[:len(frames)-1]
					}
				}
				werr := make(chan error, 1)
				go func() { werr <- h2rdWrite(wc, s, seed, mode.pauses) }()
				if mode.atOnce {
					// Everything queued before the first read, where
					// the socket holds it all: the reads are full ones.
					select {
					case err := <-werr:
						werr <- err
					case <-time.After(time.Second):
					}
				}
				c := newConnReader(rc)
				if c.raw == nil {
					t.Fatal("not a plain socket")
				}
				nr, nv := h2rdRead(t, c, rc, s, frames, seed, mode.deadlines)
				h2rdStats.records += nr
				h2rdStats.views += nv
				if err := <-werr; err != nil {
					t.Errorf("writer: %v", err)
				}
				c.release()
				if c.big != nil || c.next != nil || c.shared != nil {
					t.Errorf("after release: big %p next %p shared %p", c.big, c.next, c.shared)
				}
				if got := c.pinnedBufs(); got != 0 {
					t.Errorf("%d read buffers still pinned", got)
				}
				if got := pinnedReadBufs.Load(); got > base {
					t.Errorf("process-wide pinned read buffers %d, was %d before", got, base)
				}
			})
			if !ok {
				return
			}
		}
	}
	t.Logf("%+v", h2rdStats)
}

// TestH2rdCloseWhileParkedInSlackFill: a fill that completes a frame in
// the slack parks (the rest has not come) holding the next buffer; the
// socket is closed under it, or its deadline passes. The fill fails with
// the error, keeps the bytes it had, gives the next buffer back, and Read
// returns those bytes and then the error; the reader then holds nothing,
// and the views made before are intact.
func TestH2rdCloseWhileParkedInSlackFill(t *testing.T) {
	for _, how := range []string{"close", "deadline"} {
		t.Run(how, func(t *testing.T) {
			base := pinnedReadBufs.Load()
			wc, rc := h2rdPair(t, "unix")
			rng := rand.New(rand.NewPCG(3, 4))
			// Four 16 KiB DATA frames less a few bytes of the last one:
			// the last is cut at 64 KiB, its rest never comes.
			var s []byte
			for i := 0; i < 4; i++ {
				s = append(s, byte(maxFrameSize>>16), byte(maxFrameSize>>8), byte(maxFrameSize&0xff), 0, 0, 0, 0, 0, 1)
				for j := 0; j < maxFrameSize; j++ {
					s = append(s, byte(rng.IntN(256)))
				}
			}
			sent := s[:connBufSize+20] // the fourth frame ends at 65,572
			if _, err := wc.Write(sent); err != nil {
				t.Fatal(err)
			}
			c := newConnReader(rc)
			var views []*pbuf
			for i := 0; i < 3; i++ {
				if !c.fillTo(frameHeaderLen) || !c.fillTo(frameHeaderLen+maxFrameSize) {
					t.Fatalf("frame %d: %v", i, c.err)
				}
				b := c.buffered()
				if v := c.view(b[frameHeaderLen : frameHeaderLen+maxFrameSize]); v != nil {
					views = append(views, v)
				}
				c.discard(frameHeaderLen + maxFrameSize)
			}
			if !c.fillTo(frameHeaderLen) {
				t.Fatal(c.err)
			}
			done := make(chan bool, 1)
			go func() { done <- c.fillTo(frameHeaderLen + maxFrameSize) }()
			time.Sleep(30 * time.Millisecond)
			if how == "close" {
				rc.Close()
			} else {
				rc.SetReadDeadline(time.Now())
			}
			var ok bool
			select {
			case ok = <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("fillTo still parked")
			}
			if ok {
				t.Fatal("fillTo completed a frame whose rest never came")
			}
			if c.err == nil || c.next != nil || c.nextW != 0 {
				t.Fatalf("after the failed fill: err %v, next %p [%d,%d)", c.err, c.next, c.nextR, c.nextW)
			}
			rest, err := io.ReadAll(c)
			if err == nil {
				t.Fatal("Read returned no error")
			}
			if want := sent[3*(frameHeaderLen+maxFrameSize):]; !bytes.Equal(rest, want) {
				t.Fatalf("Read returned %d bytes after the fill failed, want %d as sent", len(rest), len(want))
			}
			releaseFrameViews(t, c, views, s, base)
		})
	}
}

// TestH2rdEOFAfterSlackFill: the fill that completes a frame in the slack
// brings k bytes more into the next buffer, and then the stream ends. The
// reader hands out the frame, then the k bytes, then EOF, once.
func TestH2rdEOFAfterSlackFill(t *testing.T) {
	for k := 0; k <= 12; k++ {
		t.Run(fmt.Sprint(k), func(t *testing.T) {
			base := pinnedReadBufs.Load()
			wc, rc := h2rdPair(t, "unix")
			rng := rand.New(rand.NewPCG(uint64(k), 4))
			var s []byte
			for i := 0; i < 5; i++ {
				s = append(s, byte(maxFrameSize>>16), byte(maxFrameSize>>8), byte(maxFrameSize&0xff), 0, 0, 0, 0, 0, 1)
				for j := 0; j < maxFrameSize; j++ {
					s = append(s, byte(rng.IntN(256)))
				}
			}
			s = s[:4*(frameHeaderLen+maxFrameSize)+k]
			if _, err := wc.Write(s); err != nil {
				t.Fatal(err)
			}
			wc.(*net.UnixConn).CloseWrite()
			c := newConnReader(rc)
			var views []*pbuf
			for i := 0; i < 4; i++ {
				if !c.fillTo(frameHeaderLen) || !c.fillTo(frameHeaderLen+maxFrameSize) {
					t.Fatalf("frame %d: %v", i, c.err)
				}
				b := c.buffered()
				off := i * (frameHeaderLen + maxFrameSize)
				if !bytes.Equal(b[:frameHeaderLen+maxFrameSize], s[off:off+frameHeaderLen+maxFrameSize]) {
					t.Fatalf("frame %d differs", i)
				}
				if v := c.view(b[frameHeaderLen : frameHeaderLen+maxFrameSize]); v != nil {
					views = append(views, v)
				}
				c.discard(frameHeaderLen + maxFrameSize)
			}
			if i := 3; c.nextW != k {
				t.Logf("after frame %d: %d bytes in next, want %d (the fill was not one readv)", i, c.nextW, k)
			}
			if c.fillTo(frameHeaderLen) != (k >= frameHeaderLen) {
				t.Fatalf("fillTo(header) with %d bytes left: %v", k, c.err)
			}
			rest, err := io.ReadAll(c)
			if err != nil || !bytes.Equal(rest, s[4*(frameHeaderLen+maxFrameSize):]) {
				t.Fatalf("the rest: %d bytes, %v; want %d", len(rest), err, k)
			}
			if n, err := c.Read(make([]byte, 10)); n != 0 || err == nil {
				t.Fatalf("Read after EOF: %d, %v", n, err)
			}
			releaseFrameViews(t, c, views, s, base)
		})
	}
}

// h2rdKnobs returns the stress tests' iteration count (H2RD_ITER, 3 by
// default) and first seed (H2RD_SEED, the clock's by default).
func h2rdKnobs() (iters int, seed uint64) {
	iters = 3
	if v := os.Getenv("H2RD_ITER"); v != "" {
		fmt.Sscan(v, &iters)
	}
	seed = uint64(time.Now().UnixNano())
	if v := os.Getenv("H2RD_SEED"); v != "" {
		fmt.Sscan(v, &seed)
	}
	return iters, seed
}

// releaseFrameViews checks that each view i still holds the payload of
// the i-th whole frame of sent, s, and frees it; then releases c and
// checks that it holds no buffer and that the process pins no more read
// buffers than base.
func releaseFrameViews(t *testing.T, c *connReader, views []*pbuf, s []byte, base int32) {
	t.Helper()
	for i, v := range views {
		off := i*(frameHeaderLen+maxFrameSize) + frameHeaderLen
		if !bytes.Equal(v.b, s[off:off+maxFrameSize]) {
			t.Errorf("view %d changed", i)
		}
		putBuf(v)
	}
	c.release()
	if c.big != nil || c.next != nil || c.pinnedBufs() != 0 || pinnedReadBufs.Load() > base {
		t.Errorf("after release: big %p next %p pinned %d, process %d (was %d)", c.big, c.next, c.pinnedBufs(), pinnedReadBufs.Load(), base)
	}
}
