package proxy_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
)

// boundary reports whether n bytes of the gRPC message stream p end at a
// message boundary.
func boundary(p []byte, n int) bool {
	at := 0
	for at < n {
		if at+5 > len(p) {
			return false
		}
		at += 5 + int(binary.BigEndian.Uint32(p[at+1:]))
	}
	return at == n
}

// TestAttackViewsBackendFailsMidAnswer: the backend answers concurrent
// calls with DATA frames of sizes around the view threshold (queued as
// views toward clients that read, some slowly), then fails in the middle
// of the answer: RST_STREAM (CANCEL, INTERNAL_ERROR), GOAWAY and close, or
// a plain close. Whatever a client receives must be the start of what the
// backend sent, byte for byte; a stream ended with trailers must end at a
// message boundary (midstream.go, holdback.go: never a torn message).
func TestAttackViewsBackendFailsMidAnswer(t *testing.T) {
	verifyNoLeaks(t)
	sizes := []int{4091, 10, 16379, 65536, 100000, 3, 200000, 8187, 5000}
	for _, seed := range seeds(4) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 7))
			addr := scriptBackend(t, func(id uint32) []byte { return grpcStream(id, 1<<20, sizes...) })
			const window = 32 << 10
			srv, r := viewsClient(t, addr, window)
			want := map[uint32]int{}
			scripts := map[uint32]string{}
			for i := range 16 {
				id := uint32(2*i + 1)
				sc, n := randomScript(rng, 150_000)
				// Cut the script before its end and fail there.
				steps := strings.Split(sc, ",")
				steps = steps[:1+rng.IntN(len(steps)-1)]
				n = 0
				for _, s := range steps[1:] {
					var k int
					fmt.Sscanf(strings.TrimLeft(s, "+dDp"), "%d", &k)
					n += k
				}
				fail := []string{"r8", "r2", "r2", "r8"}[rng.IntN(4)]
				if i == 15 {
					fail = []string{"c", "g"}[rng.IntN(2)]
				}
				steps = append(steps, fail)
				want[id], scripts[id] = n, strings.Join(steps, ",")
				r.scriptCall(id, scripts[id])
			}
			got, how := r.readAll(t, want, window)
			ends := map[string]int{}
			for id := range want {
				part := "whole"
				if len(got[id]) < want[id] {
					part = "part"
				}
				ends[how[id]+"/"+part]++
			}
			t.Logf("ends: %v", ends)
			for id, n := range want {
				exp := grpcStream(id, 1<<20, sizes...)[:n]
				g := got[id]
				if !bytes.HasPrefix(exp, g) {
					at := 0
					for at < min(len(g), n) && g[at] == exp[at] {
						at++
					}
					t.Errorf("stream %d (%s): %d bytes are not the start of the %d sent; first difference at %d; script %s", id, how[id], len(g), n, at, scripts[id])
					continue
				}
				if strings.HasPrefix(how[id], "grpc-status") && !boundary(exp, len(g)) {
					t.Errorf("stream %d (%s): ended with trailers after %d bytes, inside a message (torn); script %s", id, how[id], len(g), scripts[id])
				}
			}
			waitViewsFreed(t, srv, "after the calls")
		})
	}
}
