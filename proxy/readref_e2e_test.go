package proxy_test

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/streamlb/streamlb/internal/testkit"
	"google.golang.org/grpc"
)

// rawBytes is a gRPC codec of raw bytes: *[]byte in and out.
type rawBytes struct{}

func (rawBytes) Marshal(v any) ([]byte, error) { return *v.(*[]byte), nil }
func (rawBytes) Unmarshal(data []byte, v any) error {
	*v.(*[]byte) = append([]byte(nil), data...)
	return nil
}
func (rawBytes) Name() string { return "raw" }

// serveRawGRPC serves every method with handle on a grpc-go server of
// raw-bytes messages (with opts) on 127.0.0.1, stopped at cleanup, and
// returns its address.
func serveRawGRPC(t *testing.T, handle func(grpc.ServerStream) error, opts ...grpc.ServerOption) string {
	t.Helper()
	gs := grpc.NewServer(append([]grpc.ServerOption{grpc.ForceServerCodec(rawBytes{}), grpc.UnknownServiceHandler(func(_ any, ss grpc.ServerStream) error {
		return handle(ss)
	})}, opts...)...)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	return ln.Addr().String()
}

// hashMsg adds message m to h as the request-integrity tests hash a
// request: its length, then its bytes.
func hashMsg(h hash.Hash, m []byte) {
	binary.Write(h, binary.BigEndian, uint32(len(m)))
	h.Write(m)
}

// hashingBackend serves a backend that answers every call with the
// SHA-256 of the request messages it read (hashMsg).
func hashingBackend(t *testing.T) string {
	return serveRawGRPC(t, func(ss grpc.ServerStream) error {
		h := sha256.New()
		for {
			var m []byte
			if err := ss.RecvMsg(&m); err != nil {
				break
			}
			hashMsg(h, m)
		}
		out := h.Sum(nil)
		return ss.SendMsg(&out)
	})
}

// seededMessage is message i of a stream seeded with seed: n bytes no other
// message of the test has at the same place.
func seededMessage(seed uint64, i, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, uint64(i)))
	b := make([]byte, n)
	for j := 0; j+8 <= n; j += 8 {
		binary.LittleEndian.PutUint64(b[j:], rng.Uint64())
	}
	for j := n &^ 7; j < n; j++ {
		b[j] = byte(rng.Uint32())
	}
	return b
}

// TestRelayedBytesExact streams messages of many sizes (small ones, whole
// and cut 16 KiB frames, held ones up to the hold-back bound, larger ones
// relayed as they come) on concurrent calls through the proxy, each
// message's bytes its own, half the clients reading slowly so that the
// backend reader's buffers wait in queues and hold-backs while it reads on
// (views of the read buffer, readref.go, and the copies made past their
// limit). Every message must arrive as sent: a read buffer filled again
// while a view of it waited would show as changed bytes.
func TestRelayedBytesExact(t *testing.T) {
	verifyNoLeaks(t)
	sizes := []int{10, 4090, 5000, 16379, 16384, 16385, 40000, 65536, 100000, 131072, 200000}
	addr := serveRawGRPC(t, func(ss grpc.ServerStream) error {
		var req []byte
		if err := ss.RecvMsg(&req); err != nil {
			return err
		}
		seed := binary.BigEndian.Uint64(req)
		rng := rand.New(rand.NewPCG(seed, 0))
		for i := range 40 {
			m := seededMessage(seed, i, sizes[rng.IntN(len(sizes))])
			if err := ss.SendMsg(&m); err != nil {
				return err
			}
		}
		return nil
	})
	e := newEnv(t, envOpts{backends: 1})
	e.setBackends(addr)
	ctx := testkit.Context(t, 60*time.Second)
	const calls = 8
	errs := make(chan error, calls)
	var wg sync.WaitGroup
	for c := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- func() error {
				seed := uint64(1000 + c)
				st, err := e.cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/streamlb.test.Raw/Stream", grpc.ForceCodec(rawBytes{}))
				if err != nil {
					return err
				}
				req := binary.BigEndian.AppendUint64(nil, seed)
				if err := st.SendMsg(&req); err != nil {
					return err
				}
				if err := st.CloseSend(); err != nil {
					return err
				}
				rng := rand.New(rand.NewPCG(seed, 0))
				for i := range 40 {
					want := seededMessage(seed, i, sizes[rng.IntN(len(sizes))])
					var got []byte
					if err := st.RecvMsg(&got); err != nil {
						return fmt.Errorf("call %d, message %d: %v", c, i, err)
					}
					if string(got) != string(want) {
						return fmt.Errorf("call %d, message %d: %d bytes differ from the %d sent", c, i, len(got), len(want))
					}
					if c%2 == 1 {
						time.Sleep(2 * time.Millisecond)
					}
				}
				var extra []byte
				if err := st.RecvMsg(&extra); err == nil {
					return fmt.Errorf("call %d: a message after the last", c)
				}
				return nil
			}()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}
