package proxy_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/streamlb/streamlb/internal/testkit"
	"github.com/streamlb/streamlb/proxy"
)

var atk1Bytes, atk1Frames, atk1Fails, atk1Resets, atk1GoAways atomic.Int64

// atk1Picker sends every first attempt to first, retries to other.
type atk1Picker struct{ first, other string }

func (p atk1Picker) Pick(context.Context, string) (string, func(error), error) {
	return p.first, nil, nil
}

func (p atk1Picker) PickExcluding(_ context.Context, _ string, tried []string) (string, func(error), error) {
	for _, a := range tried {
		if a == p.first {
			return p.other, nil, nil
		}
	}
	return p.first, nil, nil
}

// windowGameBackend is a raw HTTP/2 backend that plays with the request's
// flow-control windows: a small initial stream window (one of several per
// connection), WINDOW_UPDATEs of 1 byte and of odd sizes, SETTINGS that
// lower the initial window mid-stream (the proxy's stream windows go
// negative) and raise it again; after failAt request bytes of a stream
// (header x-fail-at), it ends the stream with UNAVAILABLE trailers-only
// and RST_STREAM(NO_ERROR) (header x-mode 0), RST_STREAM(REFUSED_STREAM)
// (1), a GOAWAY that says the stream was not processed (2), or closes
// the connection (3). The proxy retries all of them.
func windowGameBackend(t *testing.T) string {
	var connN int
	var mu sync.Mutex
	return rawBackend(t, func(nc net.Conn) {
		mu.Lock()
		connN++
		cn := connN
		mu.Unlock()
		s, err := acceptH2(nc)
		if err != nil {
			return
		}
		s.buffered()
		wins := []uint32{1, 4095, 4096, 4097, 5000, 16383, 16385, 7}
		win := wins[cn%len(wins)]
		if s.hello(http2.Setting{ID: http2.SettingInitialWindowSize, Val: win}) != nil {
			return
		}
		s.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		type st struct {
			got, failAt, mode int
			done              bool
			frames            int
		}
		streams := map[uint32]*st{}
		var hb bytes.Buffer
		enc := hpack.NewEncoder(&hb)
		step := 0
		goneAway := false
		s.serve(func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.MetaHeadersFrame:
				x := &st{failAt: -1}
				for _, h := range f.Fields {
					switch h.Name {
					case "x-fail-at":
						x.failAt, _ = strconv.Atoi(h.Value)
					case "x-mode":
						x.mode, _ = strconv.Atoi(h.Value)
					}
				}
				streams[f.StreamID] = x
				if x.failAt == 0 {
					x.done = true
					return fail(s.fr, &hb, enc, f.StreamID, x.mode, &goneAway)
				}
			case *http2.DataFrame:
				n := len(f.Data())
				if n > 0 {
					s.fr.WriteWindowUpdate(0, uint32(n))
				}
				x := streams[f.StreamID]
				if x == nil || x.done {
					return true
				}
				x.got += n
				x.frames++
				atk1Bytes.Add(int64(n))
				atk1Frames.Add(1)
				if (x.failAt >= 0 && x.got >= x.failAt) || f.StreamEnded() {
					x.done = true
					return fail(s.fr, &hb, enc, f.StreamID, x.mode, &goneAway)
				}
				if n == 0 {
					return true
				}
				step++
				switch step % 5 {
				case 0: // back in 1-byte updates, then the rest
					for range min(n, 3) {
						s.fr.WriteWindowUpdate(f.StreamID, 1)
					}
					if n > 3 {
						s.fr.WriteWindowUpdate(f.StreamID, uint32(n-3))
					}
				case 1: // lower the initial window (negative), then raise it
					s.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
					s.fr.WriteWindowUpdate(f.StreamID, uint32(n))
					s.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: win + 4096})
				case 2:
					s.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: win})
					s.fr.WriteWindowUpdate(f.StreamID, uint32(n))
				default:
					s.fr.WriteWindowUpdate(f.StreamID, uint32(n)+uint32(step%3))
				}
			case *http2.RSTStreamFrame:
				delete(streams, f.StreamID)
			}
			return true
		})
	})
}

// atk1RetryProxy serves a proxy that sends the first attempt of every
// /x.Y/ call to bad and its retries to good, with retry budget and buffer
// for requests of up to 1 MiB.
func atk1RetryProxy(t *testing.T, bad, good string) net.Listener {
	t.Helper()
	return newProxyListener(t, proxy.Config{Picker: atk1Picker{bad, good}, Logger: quietLog, RetryOn: []string{"/x.Y/"},
		RetryBudget: 1 << 20, RetryBufferSize: 1 << 20, MaxConnBufferedBytes: 64 << 20})
}

// fail fails stream id as x-mode says; false: the connection is to close.
func fail(fr *http2.Framer, hb *bytes.Buffer, enc *hpack.Encoder, id uint32, mode int, goneAway *bool) bool {
	atk1Fails.Add(1)
	if mode == 2 && *goneAway {
		mode = 1 // a second GOAWAY may not raise the last stream id
	}
	switch mode {
	case 1:
		fr.WriteRSTStream(id, http2.ErrCodeRefusedStream)
		return true
	case 2: // GOAWAY: this stream and those after it were not processed
		*goneAway = true
		fr.WriteGoAway(max(id, 2)-2, http2.ErrCodeNo, nil)
		return true
	case 3: // the connection dies
		return false
	}
	hb.Reset()
	for _, f := range [][2]string{{":status", "200"}, {"content-type", "application/grpc"}, {"grpc-status", "14"}, {"grpc-message", "try another"}} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: true})
	fr.WriteRSTStream(id, http2.ErrCodeNo)
	return true
}

// TestAtk1RetryAfterWindowGames: client-streaming calls of a RetryOn method
// whose first attempt goes to a backend that keeps the request's windows
// tiny and odd (DATA items cut by the window, held across updates, some
// written by reference), lowers them below zero mid-stream, and fails the
// attempt after some bytes; the retry on a grpc-go backend must get the
// request exactly as sent (SHA-256 of every message).
func TestAtk1RetryAfterWindowGames(t *testing.T) {
	verifyNoLeaks(t)
	good := hashingBackend(t)
	atk1Bytes.Store(0)
	atk1Frames.Store(0)
	atk1Fails.Store(0)
	bad := windowGameBackend(t)
	ln := atk1RetryProxy(t, bad, good)
	cc := fixedWindowConn(t, ln.Addr().String(), 1<<20)
	ctx := testkit.Context(t, 60*time.Second)
	sizes := []int{4091, 4096, 4101, 16379, 16384, 16389, 1, 0, 8192, 12000, 4095, 20000}
	failAts := []int{0, 1, 4096, 4100, 4101 + 5, 9000, 16384, 30000, 50000, 1 << 30}
	reps := attackCount(2, 20)
	// Call k (from 1) is repetition (k-1)/(4*len(failAts)), of every
	// failAt in turn, and of every mode for each.
	concurrently(t, reps*len(failAts)*4, 16, func(k int) error {
		call, rep, failAt, mode := k+1, k/(4*len(failAts)), failAts[k/4%len(failAts)], k%4
		cctx := metadata.AppendToOutgoingContext(ctx, "x-fail-at", strconv.Itoa(failAt), "x-mode", strconv.Itoa(mode))
		st, err := cc.NewStream(cctx, &grpc.StreamDesc{ClientStreams: true}, "/x.Y/Z", grpc.ForceCodec(rawBytes{}))
		if err != nil {
			return err
		}
		h := sha256.New()
		for i := range 12 {
			m := seededMessage(uint64(call), i, sizes[(i+call)%len(sizes)])
			hashMsg(h, m)
			if rep%2 == 1 && i%3 == 0 {
				time.Sleep(time.Millisecond)
			}
			if err := st.SendMsg(&m); err != nil {
				break
			}
		}
		st.CloseSend()
		var got []byte
		if err := st.RecvMsg(&got); err != nil {
			return fmt.Errorf("call %d (fail at %d, mode %d): %v", call, failAt, mode, err)
		}
		if !bytes.Equal(got, h.Sum(nil)) {
			return fmt.Errorf("call %d (fail at %d, mode %d): the retry's backend got a request other than the one sent", call, failAt, mode)
		}
		return nil
	})
	t.Logf("bad backend: %d bytes in %d frames, %d attempts failed", atk1Bytes.Load(), atk1Frames.Load(), atk1Fails.Load())
}

// atk1StreamReq is the request body (gRPC-framed) rawStreamServer takes:
// seed, count, sizes.
func atk1StreamReq(seed uint32, count int, sizes []int) []byte {
	req := binary.BigEndian.AppendUint32(nil, seed)
	req = binary.BigEndian.AppendUint32(req, uint32(count))
	for _, s := range sizes {
		req = binary.BigEndian.AppendUint32(req, uint32(s))
	}
	msg := []byte{0}
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(req)))
	return append(msg, req...)
}

// TestAtk1RawClientWindowGames: raw HTTP/2 clients of several streams
// each, on one connection, read server-streamed messages of sizes around
// 4 KiB and 16 KiB while playing with the proxy's windows toward them: a
// tiny or odd initial window, WINDOW_UPDATEs of 1 byte, credit returned
// late, SETTINGS that lower the initial window below zero mid-stream and
// raise it again; some streams are reset mid-response. So the proxy's
// response items (pooled copies and views of the backend's read buffer)
// are cut by the windows and held across updates, and some dropped while
// a part of them is pending. Every message of every stream that is not
// reset must arrive as sent, and the reset ones' bytes up to the reset.
func TestAtk1RawClientWindowGames(t *testing.T) {
	verifyNoLeaks(t)
	addr := rawStreamServer(t)
	ln := newProxyListener(t, proxy.Config{Picker: pickerTo(addr), Logger: quietLog, MaxConnBufferedBytes: 64 << 20})
	atk1Bytes.Store(0)
	atk1Frames.Store(0)
	sizes := []int{4091, 4096, 4101, 16379, 16384, 16389, 3, 8192, 12000, 4095, 20000, 40000, 0, 65536}
	const count = 30
	concurrently(t, attackCount(4, 24), 4, func(ci int) error {
		if err := atk1RawClient(t, ln.Addr().String(), ci, sizes, count); err != nil {
			return fmt.Errorf("conn %d: %v", ci, err)
		}
		return nil
	})
	t.Logf("clients: %d bytes in %d frames; %d streams reset by the proxy, %d connections ended with GOAWAY", atk1Bytes.Load(), atk1Frames.Load(), atk1Resets.Swap(0), atk1GoAways.Swap(0))
}

func atk1RawClient(t *testing.T, addr string, ci int, sizes []int, count int) error {
	return atk1RawClientOpts(addr, ci, sizes, count, nil)
}

// atk1RawClientOpts is atk1RawClient; extra, if set, gives stream k's extra
// request headers and whether its response may end early (a failure):
// then only the bytes received are checked.
func atk1RawClientOpts(addr string, ci int, sizes []int, count int, extra func(k int, seed uint32) ([][2]string, bool)) error {
	nc, bw, fr, err := dialRawBuffered(addr)
	if err != nil {
		return err
	}
	defer nc.Close()
	wins := []uint32{1, 4095, 4096, 4097, 5000, 16383, 16385, 7, 0}
	win := wins[ci%len(wins)]
	fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: win})
	const nstreams = 6
	type st struct {
		seed     uint32
		got      []byte
		resetAt  int
		reset    bool
		done     bool
		owed     int
		shift    []int
		win      int64 // what we granted and it has not used
		msgSizes []int
		lenient  bool
	}
	streams := map[uint32]*st{}
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for k := range nstreams {
		id := uint32(1 + 2*k)
		x := &st{seed: uint32(ci*100 + k), resetAt: -1}
		x.shift = append(sizes[(ci+k)%len(sizes):], sizes[:(ci+k)%len(sizes)]...)
		if extra == nil && (k == 2 || k == 5) || extra != nil && k == 4 && ci%2 == 0 {
			x.resetAt = 5000*(ci%7+1) + 4096*k
		}
		streams[id] = x
		hb.Reset()
		fields := [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", "/x.Y/Z"}, {":authority", "x"}, {"content-type", "application/grpc"}, {"te", "trailers"}}
		if extra != nil {
			more, lenient := extra(k, x.seed)
			fields = append(fields, more...)
			x.lenient = lenient
			x.shift = sizes
		}
		for _, f := range fields {
			enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true})
		fr.WriteData(id, true, atk1StreamReq(x.seed, count, x.shift))
		if win < 2 {
			fr.WriteWindowUpdate(id, 4096)
		}
	}
	bw.Flush()
	left := nstreams
	step := 0
	recvd := 0
	goAway := false
	curWin := win
	for left > 0 {
		f, err := fr.ReadFrame()
		if err != nil {
			return fmt.Errorf("reading: %v (%d streams left)", err, left)
		}
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			return fmt.Errorf("GOAWAY %v %q", f.ErrCode, f.DebugData())
		case *http2.MetaHeadersFrame:
			x := streams[f.StreamID]
			if x == nil || x.done {
				continue
			}
			if f.StreamEnded() {
				bad := f.PseudoValue("status") != ""
				for _, h := range f.Fields {
					if h.Name == "grpc-status" && h.Value != "0" {
						bad = true
					}
				}
				if bad && !x.lenient {
					return fmt.Errorf("stream %d: %v", f.StreamID, f.Fields)
				}
				x.done = true
				left--
				if err := atk1Check(x.seed, x.got, x.shift, count, !bad); err != nil {
					return fmt.Errorf("stream %d: %v", f.StreamID, err)
				}
			}
		case *http2.RSTStreamFrame:
			x := streams[f.StreamID]
			if x == nil || !x.lenient {
				return fmt.Errorf("stream %d reset by the proxy: %v", f.StreamID, f.ErrCode)
			}
			if !x.done {
				x.done = true
				left--
				atk1Resets.Add(1)
				if err := atk1Check(x.seed, x.got, x.shift, count, false); err != nil {
					return fmt.Errorf("stream %d (reset by the proxy): %v", f.StreamID, err)
				}
			}
		case *http2.DataFrame:
			n := len(f.Data())
			if n > 0 {
				fr.WriteWindowUpdate(0, uint32(n))
			}
			x := streams[f.StreamID]
			if x == nil {
				return fmt.Errorf("DATA on unknown stream %d", f.StreamID)
			}
			if x.done {
				continue // after our reset
			}
			x.got = append(x.got, f.Data()...)
			atk1Bytes.Add(int64(n))
			atk1Frames.Add(1)
			recvd += n
			if ci%5 == 3 && recvd >= 30000+ci*1000 {
				nc.Close() // abruptly, items pending toward us
				return nil
			}
			if ci%5 == 2 && f.StreamID == 3 && !x.lenient && len(x.got) >= 9000 {
				// Overflow this stream's window (§6.9.1): the proxy resets
				// it, dropping its queue with a part of an item pending.
				x.lenient = true
				fr.WriteWindowUpdate(f.StreamID, 1<<31-1)
				fr.WriteWindowUpdate(f.StreamID, 1<<31-1)
			}
			if extra == nil && ci%10 == 1 && recvd >= 25000+ci*500 {
				// Overflow the connection's window: GOAWAY, and the
				// connection closes with items pending.
				fr.WriteWindowUpdate(0, 1<<31-1)
				fr.WriteWindowUpdate(0, 1<<31-1)
				bw.Flush()
				for {
					f, err := fr.ReadFrame()
					if err != nil {
						return nil
					}
					if g, ok := f.(*http2.GoAwayFrame); ok {
						atk1GoAways.Add(1)
						if g.ErrCode != http2.ErrCodeFlowControl {
							return fmt.Errorf("GOAWAY %v, want FLOW_CONTROL_ERROR", g.ErrCode)
						}
						return nil
					}
				}
			}
			if ci%5 == 4 && !goAway && recvd >= 20000+ci*1000 {
				goAway = true
				fr.WriteGoAway(0, http2.ErrCodeNo, nil)
			}
			if x.resetAt >= 0 && len(x.got) >= x.resetAt {
				fr.WriteRSTStream(f.StreamID, http2.ErrCodeCancel)
				x.done, x.reset = true, true
				left--
				if err := atk1Check(x.seed, x.got, x.shift, count, false); err != nil {
					return fmt.Errorf("stream %d (reset): %v", f.StreamID, err)
				}
				break
			}
			if n == 0 {
				break
			}
			step++
			x.owed += n
			switch step % 6 {
			case 0: // 1-byte updates, the rest later
				for range min(x.owed, 2) {
					fr.WriteWindowUpdate(f.StreamID, 1)
				}
				x.owed -= min(x.owed, 2)
			case 1: // lower the initial window below zero, then restore
				fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
				bw.Flush()
				fr.WriteWindowUpdate(f.StreamID, uint32(x.owed))
				x.owed = 0
				curWin = []uint32{win, win + 4096, 4096, 16384}[step%4]
				fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: curWin})
			case 2:
				if step%4 == 2 {
					time.Sleep(time.Millisecond)
				}
				fallthrough
			default:
				fr.WriteWindowUpdate(f.StreamID, uint32(x.owed))
				x.owed = 0
			}
			// A stream whose window may be empty now gets what it is owed
			// when nothing else could wake it: give all owed back every few
			// frames.
			if step%3 == 0 {
				for id, y := range streams {
					if !y.done && y.owed > 0 {
						fr.WriteWindowUpdate(id, uint32(y.owed))
						y.owed = 0
					}
				}
			}
			if curWin == 0 {
				for id, y := range streams {
					if !y.done {
						fr.WriteWindowUpdate(id, 4096)
					}
				}
			}
		case *http2.SettingsFrame, *http2.PingFrame:
			testkit.AckControl(fr, f)
		}
		bw.Flush()
	}
	return nil
}

// atk1Check parses got as gRPC messages and compares them with what
// rawStreamServer sent for seed; whole requires all count messages.
func atk1Check(seed uint32, got []byte, sizes []int, count int, whole bool) error {
	for i := 0; i < count; i++ {
		want := seededMessage(uint64(seed), i, sizes[i%len(sizes)])
		if len(got) < 5 {
			if whole || (len(got) > 0 && got[0] != 0) {
				return fmt.Errorf("message %d: %d bytes of prefix", i, len(got))
			}
			return nil
		}
		if got[0] != 0 {
			return fmt.Errorf("message %d: flag %#x", i, got[0])
		}
		n := int(binary.BigEndian.Uint32(got[1:]))
		if n != len(want) {
			return fmt.Errorf("message %d: length %d (%#x), want %d", i, n, n, len(want))
		}
		body := got[5:]
		if len(body) < n {
			if whole || !bytes.Equal(body, want[:len(body)]) {
				return fmt.Errorf("message %d: %d of %d bytes, equal %v", i, len(body), n, bytes.Equal(body, want[:len(body)]))
			}
			return nil
		}
		if !bytes.Equal(body[:n], want) {
			return fmt.Errorf("message %d: %d bytes differ from those sent", i, n)
		}
		got = body[n:]
	}
	if len(got) > 0 {
		return fmt.Errorf("%d bytes after the last message", len(got))
	}
	return nil
}

// atk1Body is the gRPC-framed response body of seed: count seeded
// messages of sizes, cycled.
func atk1Body(seed uint32, sizes []int, count int) []byte {
	var out []byte
	for i := range count {
		m := seededMessage(uint64(seed), i, sizes[i%len(sizes)])
		out = append(out, 0)
		out = binary.BigEndian.AppendUint32(out, uint32(len(m)))
		out = append(out, m...)
	}
	return out
}

// dyingStreamBackend is a raw HTTP/2 backend that answers each request
// (headers x-seed, x-fail-at, x-mode) with the seeded body in DATA frames
// of odd sizes, within the proxy's windows, and after x-fail-at bytes
// fails: mode 0 closes the connection, 1 resets the stream (INTERNAL), 2
// sends GOAWAY and closes, 3 ends with UNAVAILABLE trailers, 4 lowers
// nothing and ends normally (OK trailers).
func dyingStreamBackend(t *testing.T, sizes []int, count int) string {
	return rawBackend(t, func(nc net.Conn) {
		s, err := acceptH2(nc)
		if err != nil {
			return
		}
		s.buffered()
		if s.hello() != nil {
			return
		}
		s.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		type st struct {
			body         []byte
			sent, failAt int
			mode         int
			win          int64
			done, ended  bool
		}
		streams := map[uint32]*st{}
		var order []uint32
		connWin, initWin := int64(65535), int64(65535)
		var hb bytes.Buffer
		enc := hpack.NewEncoder(&hb)
		frameSizes := []int{4096, 4100, 16384, 3000, 5000, 9, 8192, 4095, 12000}
		fi := 0
		headers := func(id uint32, end bool, f ...[2]string) {
			hb.Reset()
			for _, x := range f {
				enc.WriteField(hpack.HeaderField{Name: x[0], Value: x[1]})
			}
			s.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true, EndStream: end})
		}
		quit := false
		pump := func() {
			for _, id := range order {
				x := streams[id]
				if x == nil || x.done {
					continue
				}
				for !x.done {
					if x.sent >= x.failAt || x.sent == len(x.body) {
						x.done = true
						switch {
						case x.mode == 4 || x.sent == len(x.body):
							headers(id, true, [2]string{"grpc-status", "0"})
						case x.mode == 0:
							s.flush()
							quit = true
							return
						case x.mode == 1:
							s.fr.WriteRSTStream(id, http2.ErrCodeInternal)
						case x.mode == 2:
							s.fr.WriteGoAway(0, http2.ErrCodeNo, nil)
							s.flush()
							quit = true
							return
						default:
							headers(id, true, [2]string{"grpc-status", "14"}, [2]string{"grpc-message", "dying"})
						}
						break
					}
					n := frameSizes[fi%len(frameSizes)]
					n = min(n, len(x.body)-x.sent, x.failAt-x.sent)
					n = int(min(int64(n), x.win, connWin))
					if n <= 0 {
						break
					}
					fi++
					s.fr.WriteData(id, false, x.body[x.sent:x.sent+n])
					x.sent += n
					x.win -= int64(n)
					connWin -= int64(n)
				}
			}
		}
		s.serve(func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.MetaHeadersFrame:
				x := &st{win: initWin}
				var seed uint64
				for _, h := range f.Fields {
					switch h.Name {
					case "x-seed":
						seed, _ = strconv.ParseUint(h.Value, 10, 32)
					case "x-fail-at":
						x.failAt, _ = strconv.Atoi(h.Value)
					case "x-mode":
						x.mode, _ = strconv.Atoi(h.Value)
					}
				}
				x.body = atk1Body(uint32(seed), sizes, count)
				streams[f.StreamID] = x
				order = append(order, f.StreamID)
				headers(f.StreamID, false, [2]string{":status", "200"}, [2]string{"content-type", "application/grpc"})
			case *http2.WindowUpdateFrame:
				if f.StreamID == 0 {
					connWin += int64(f.Increment)
				} else if x := streams[f.StreamID]; x != nil {
					x.win += int64(f.Increment)
				}
			case *http2.SettingsFrame:
				if v, ok := f.Value(http2.SettingInitialWindowSize); ok {
					for _, x := range streams {
						x.win += int64(v) - initWin
					}
					initWin = int64(v)
				}
			case *http2.RSTStreamFrame:
				if x := streams[f.StreamID]; x != nil {
					x.done = true
				}
			case *http2.DataFrame:
				if n := len(f.Data()); n > 0 {
					s.fr.WriteWindowUpdate(0, uint32(n))
				}
			}
			pump()
			return !quit
		})
	})
}

// TestAtk1DyingBackendTinyWindows: a raw backend streams seeded messages in
// DATA frames of odd sizes (views of the proxy's read buffer and copies,
// some held back as partial messages) and then dies in one of several
// ways (connection closed, RST_STREAM, GOAWAY and close, UNAVAILABLE
// trailers) or ends normally, while raw clients with tiny and changing
// windows read (the response items cut by the windows, parts of them
// pending by reference, the queue then cut at a message boundary). The
// bytes every client receives must be those sent, and the normal ends
// complete.
func TestAtk1DyingBackendTinyWindows(t *testing.T) {
	verifyNoLeaks(t)
	sizes := []int{4091, 4096, 16379, 3, 16384, 8192, 12000, 20000, 4101}
	const count = 12
	addr := dyingStreamBackend(t, sizes, count)
	ln := newProxyListener(t, proxy.Config{Picker: pickerTo(addr), Logger: quietLog, MaxConnBufferedBytes: 64 << 20, BackendStreamsPerConn: 2})
	atk1Bytes.Store(0)
	atk1Frames.Store(0)
	total := len(atk1Body(0, sizes, count))
	failAts := []int{1, 4096, 4100, 9000, 16384, 20000, 33000, 50000, total / 2, total - 1}
	concurrently(t, attackCount(6, 40), 4, func(ci int) error {
		err := atk1RawClientOpts(ln.Addr().String(), ci, sizes, count, func(k int, seed uint32) ([][2]string, bool) {
			mode := (ci + k) % 5
			if k == 0 {
				mode = 4
			}
			fa := failAts[(ci*7+k)%len(failAts)]
			if mode == 4 {
				fa = 1 << 30
			}
			return [][2]string{{"x-seed", strconv.Itoa(int(seed))}, {"x-fail-at", strconv.Itoa(fa)}, {"x-mode", strconv.Itoa(mode)}}, true
		})
		if err != nil {
			return fmt.Errorf("conn %d: %v", ci, err)
		}
		return nil
	})
	t.Logf("clients: %d bytes in %d frames; %d streams reset by the proxy, %d connections ended with GOAWAY", atk1Bytes.Load(), atk1Frames.Load(), atk1Resets.Swap(0), atk1GoAways.Swap(0))
}

// TestAtk1RawRequestFragments: a raw client sends a client-streaming
// request of messages around 4 KiB and 16 KiB in DATA frames of odd sizes
// (1, 7, 4095 to 4097, 16384 bytes; some padded), which the proxy
// coalesces into its queue's buffers while the window-playing backend
// cuts them (partial items held across its updates, lowered below zero
// mid-stream) and then fails the attempt; the retry's grpc-go backend
// must get the request exactly as sent (SHA-256 of every message).
func TestAtk1RawRequestFragments(t *testing.T) {
	verifyNoLeaks(t)
	good := hashingBackend(t)
	bad := windowGameBackend(t)
	ln := atk1RetryProxy(t, bad, good)
	sizes := []int{4091, 4096, 1, 4101, 16379, 0, 4095, 9000, 16384, 5}
	frags := []int{1, 7, 4095, 4096, 4097, 16384, 100, 4090, 3}
	failAts := []int{0, 1, 4096, 4100, 9000, 16384, 30000, 1 << 30}
	concurrently(t, attackCount(48, 400), 8, func(call int) error {
		if err := atk1FragCall(ln.Addr().String(), call, sizes, frags, failAts[call%len(failAts)], call/len(failAts)%4); err != nil {
			return fmt.Errorf("call %d: %v", call, err)
		}
		return nil
	})
}

func atk1FragCall(addr string, call int, sizes, frags []int, failAt, mode int) error {
	nc, bw, fr, err := dialRawBuffered(addr)
	if err != nil {
		return err
	}
	defer nc.Close()
	fr.WriteSettings()
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: requestBlock("/x.Y/Z", "x-fail-at", strconv.Itoa(failAt), "x-mode", strconv.Itoa(mode)), EndHeaders: true})
	h := sha256.New()
	var body []byte
	for i := range 7 {
		m := seededMessage(uint64(call), i, sizes[(i+call)%len(sizes)])
		hashMsg(h, m)
		body = append(body, 0)
		body = binary.BigEndian.AppendUint32(body, uint32(len(m)))
		body = append(body, m...)
	}
	want := h.Sum(nil)
	for i := 0; len(body) > 0; i++ {
		n := min(frags[(i+call)%len(frags)], len(body))
		if (i+call)%4 == 0 && n < 16000 {
			fr.WriteDataPadded(1, false, body[:n], make([]byte, (i*37)%200))
		} else {
			fr.WriteData(1, false, body[:n])
		}
		body = body[n:]
		if call%6 == 5 && len(body) < 30000 {
			// The client gives up mid-request: its items, some cut by
			// the backend's window, are dropped.
			fr.WriteRSTStream(1, http2.ErrCodeCancel)
			bw.Flush()
			time.Sleep(time.Millisecond)
			return nil
		}
		if i%5 == 4 {
			bw.Flush()
			time.Sleep(time.Duration(call%3) * 100 * time.Microsecond)
		}
	}
	fr.WriteData(1, true, nil)
	bw.Flush()
	var got []byte
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return fmt.Errorf("reading: %v", err)
		}
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			return fmt.Errorf("GOAWAY %v %q", f.ErrCode, f.DebugData())
		case *http2.RSTStreamFrame:
			return fmt.Errorf("reset %v", f.ErrCode)
		case *http2.DataFrame:
			got = append(got, f.Data()...)
		case *http2.SettingsFrame, *http2.PingFrame:
			testkit.AckControl(fr, f)
			bw.Flush()
		case *http2.MetaHeadersFrame:
			if !f.StreamEnded() {
				continue
			}
			for _, x := range f.Fields {
				if x.Name == "grpc-status" && x.Value != "0" {
					return fmt.Errorf("status %v", f.Fields)
				}
			}
			if len(got) != 5+len(want) || !bytes.Equal(got[5:], want) {
				return fmt.Errorf("the retry's backend got a request other than the one sent (%d bytes back)", len(got))
			}
			return nil
		}
	}
}

// TestAtk1BidiEchoSmallWindows: bidi echo calls through the proxy between
// grpc-go clients and a grpc-go backend both with fixed 64 KiB windows
// (no BDP growth), messages of sizes around 4 KiB and 16 KiB, some
// clients slow to read, some cancelling mid-stream: both directions' items
// are cut by the windows and some dropped with a part pending. Every echo
// must come back as sent.
func TestAtk1BidiEchoSmallWindows(t *testing.T) {
	verifyNoLeaks(t)
	addr := serveRawGRPC(t, func(ss grpc.ServerStream) error {
		for {
			var m []byte
			if err := ss.RecvMsg(&m); err != nil {
				return nil
			}
			if err := ss.SendMsg(&m); err != nil {
				return err
			}
		}
	}, grpc.InitialWindowSize(65535), grpc.InitialConnWindowSize(65535))
	ln := newProxyListener(t, proxy.Config{Picker: pickerTo(addr), Logger: quietLog, MaxConnBufferedBytes: 64 << 20,
		BackendStreamWindow: 16 << 10, BackendMaxStreamWindow: 40000})
	cc := fixedWindowConn(t, ln.Addr().String(), 65535)
	ctx := testkit.Context(t, 60*time.Second)
	sizes := []int{4091, 4096, 4101, 16379, 16384, 16389, 3, 8192, 12000, 4095, 20000, 0}
	concurrently(t, attackCount(24, 200), 12, func(call int) error {
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		st, err := cc.NewStream(cctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}, "/x.Y/Z", grpc.ForceCodec(rawBytes{}))
		if err != nil {
			return err
		}
		const n = 40
		cancelAt := -1
		if call%4 == 3 {
			cancelAt = 5 + call%17
		}
		sent := make(chan error, 1)
		go func() {
			for i := range n {
				m := seededMessage(uint64(call), i, sizes[(i+call)%len(sizes)])
				if err := st.SendMsg(&m); err != nil {
					sent <- nil
					return
				}
			}
			sent <- st.CloseSend()
		}()
		// Every message that differs is reported, not only the first.
		var differ []error
		for i := range n {
			if i == cancelAt {
				cancel()
				<-sent
				return errors.Join(differ...)
			}
			var got []byte
			if err := st.RecvMsg(&got); err != nil {
				<-sent
				return errors.Join(append(differ, fmt.Errorf("call %d, message %d: %v", call, i, err))...)
			}
			if !bytes.Equal(got, seededMessage(uint64(call), i, sizes[(i+call)%len(sizes)])) {
				differ = append(differ, fmt.Errorf("call %d, message %d: %d bytes differ from those sent", call, i, len(got)))
			}
			if call%3 == 1 && i%4 == 0 {
				time.Sleep(time.Millisecond)
			}
		}
		<-sent
		return errors.Join(differ...)
	})
}
