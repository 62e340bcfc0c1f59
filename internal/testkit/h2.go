package testkit

import "golang.org/x/net/http2"

// AckControl answers f on fr as an HTTP/2 peer must when f is a SETTINGS
// or a PING that is not itself an acknowledgement (RFC 9113 §6.5.3,
// §6.7), for the raw HTTP/2 clients and backends tests write frame by
// frame. Other frames it leaves alone.
func AckControl(fr *http2.Framer, f http2.Frame) {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if !f.IsAck() {
			fr.WriteSettingsAck()
		}
	case *http2.PingFrame:
		if !f.IsAck() {
			fr.WritePing(true, f.Data)
		}
	}
}
