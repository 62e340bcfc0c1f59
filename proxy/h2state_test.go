package proxy

import "testing"

// TestTransition is RFC 9113 §5.1 written out: every state and event, the
// state after it and what the RFC makes of it.
func TestTransition(t *testing.T) {
	t.Parallel()
	type row struct {
		next h2state
		res  h2result
	}
	// One row per state, one column per event, in h2event order: send
	// HEADERS, recv HEADERS, send END_STREAM, recv END_STREAM, send
	// RST_STREAM, recv RST_STREAM, recv DATA, recv WINDOW_UPDATE.
	const (
		I, O, HL, HR, RS, C = stIdle, stOpen, stHalfClosedLocal, stHalfClosedRemote, stResetSent, stClosed
		ok, ign, sc, pe     = resOK, resIgnore, resStreamClosed, resProtocol
	)
	want := map[h2state][8]row{
		// §5.1 idle: HEADERS opens; anything else received is
		// PROTOCOL_ERROR (RST_STREAM §6.4, WINDOW_UPDATE §6.9, DATA §6.1).
		I: {{O, ok}, {O, ok}, {I, pe}, {I, pe}, {I, pe}, {I, pe}, {I, pe}, {I, pe}},
		// open: END_STREAM half-closes the side that sent it.
		O: {{O, ok}, {O, ok}, {HL, ok}, {HR, ok}, {RS, ok}, {C, ok}, {O, ok}, {O, ok}},
		// half-closed (local): we may send nothing more but RST_STREAM.
		HL: {{HL, pe}, {HL, ok}, {HL, pe}, {C, ok}, {RS, ok}, {C, ok}, {HL, ok}, {HL, ok}},
		// half-closed (remote): the peer's frames but WINDOW_UPDATE and
		// RST_STREAM are STREAM_CLOSED.
		HR: {{HR, ok}, {HR, sc}, {C, ok}, {HR, sc}, {RS, ok}, {C, ok}, {HR, sc}, {HR, ok}},
		// closed by our RST_STREAM: the peer's frames in flight are ignored.
		RS: {{RS, ign}, {RS, ign}, {RS, ign}, {RS, ign}, {RS, ign}, {RS, ign}, {RS, ign}, {RS, ign}},
		// closed: DATA and HEADERS are STREAM_CLOSED; late RST_STREAM and
		// WINDOW_UPDATE are ignored.
		C: {{C, ign}, {C, sc}, {C, ign}, {C, sc}, {C, ign}, {C, ign}, {C, sc}, {C, ign}},
	}
	for s := stIdle; s <= stClosed; s++ {
		for ev := evSendHeaders; ev <= evRecvWindowUpdate; ev++ {
			w := want[s][ev]
			next, res := transition(s, ev)
			if next != w.next || res != w.res {
				t.Errorf("%v + %v: got (%v, %v), want (%v, %v)", s, ev, next, res, w.next, w.res)
			}
			st := s
			if got := st.apply(ev); got != w.res || st != w.next {
				t.Errorf("%v + %v: apply gave %v and state %v, want %v and %v", s, ev, got, st, w.res, w.next)
			}
			if res != resOK && next != s {
				t.Errorf("%v + %v: state changed to %v on %v", s, ev, next, res)
			}
		}
	}
}

// TestTransitionPaths runs whole streams through the machine, as the two
// roles see them.
func TestTransitionPaths(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		evs  []h2event
		want h2state
		res  h2result // of the last event
	}{
		{name: "client unary, server view", evs: []h2event{evRecvHeaders, evRecvData, evRecvEnd, evSendHeaders, evSendEnd}, want: stClosed},
		{name: "backend unary, client view", evs: []h2event{evSendHeaders, evSendEnd, evRecvHeaders, evRecvData, evRecvEnd}, want: stClosed},
		{name: "response before request ends, then RST(NO_ERROR)", evs: []h2event{evRecvHeaders, evSendHeaders, evSendEnd, evSendReset}, want: stResetSent},
		{name: "DATA after END_STREAM", evs: []h2event{evRecvHeaders, evRecvEnd, evRecvData}, want: stHalfClosedRemote, res: resStreamClosed},
		{name: "frames after our reset", evs: []h2event{evRecvHeaders, evSendReset, evRecvData}, want: stResetSent, res: resIgnore},
		{name: "peer reset, then DATA", evs: []h2event{evSendHeaders, evRecvReset, evRecvData}, want: stClosed, res: resStreamClosed},
		{name: "RST_STREAM on idle", evs: []h2event{evRecvReset}, want: stIdle, res: resProtocol},
		{name: "WINDOW_UPDATE on idle", evs: []h2event{evRecvWindowUpdate}, want: stIdle, res: resProtocol},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var s h2state
			var res h2result
			for _, ev := range tc.evs {
				res = s.apply(ev)
			}
			if s != tc.want || res != tc.res {
				t.Errorf("got (%v, %v), want (%v, %v)", s, res, tc.want, tc.res)
			}
		})
	}
}
