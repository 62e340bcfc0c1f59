package proxy_test

import (
	"sync"

	"github.com/streamlb/streamlb/proxy"
)

// callInfos collects the CallInfo of every call (Config.OnCallEnd).
type callInfos struct {
	mu sync.Mutex
	ci []proxy.CallInfo
}

func (h *callInfos) add(ci proxy.CallInfo) { h.mu.Lock(); h.ci = append(h.ci, ci); h.mu.Unlock() }

// attempts counts the calls by their CallInfo.Attempts.
func (h *callInfos) attempts() map[int]int {
	h.mu.Lock()
	defer h.mu.Unlock()
	m := map[int]int{}
	for _, c := range h.ci {
		m[c.Attempts]++
	}
	return m
}
