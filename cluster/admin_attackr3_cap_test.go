package cluster

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestAttackR3AdminConnsCap: at the admin listener's cap a new connection
// takes the place of the one that waited longest for a request, and, when
// every connection is serving one, of the one serving its request
// longest: connections held busy (a body sent slowly, a profile's
// seconds) cannot lock out a probe.
func TestAttackR3AdminConnsCap(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	capped := newAdminConns(ln, 2)
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/fast", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/slow", func(w http.ResponseWriter, _ *http.Request) { <-release; fmt.Fprintln(w, "ok") })
	hs := &http.Server{Handler: mux, ConnState: capped.ConnState}
	go hs.Serve(capped)
	defer hs.Close()

	type client struct {
		c  net.Conn
		br *bufio.Reader
	}
	dial := func() client {
		t.Helper()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(5 * time.Second))
		return client{c, bufio.NewReader(c)}
	}
	get := func(cl client, path string) (string, error) {
		fmt.Fprintf(cl.c, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path)
		resp, err := http.ReadResponse(cl.br, nil)
		if err != nil {
			return "", err
		}
		b, _ := io.ReadAll(resp.Body)
		return strings.TrimSpace(string(b)), nil
	}
	closed := func(cl client) bool {
		cl.c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err := cl.br.ReadByte()
		return err == io.EOF || (err != nil && !isTimeout(err))
	}

	a, b := dial(), dial()
	for _, cl := range []client{a, b} {
		if got, err := get(cl, "/fast"); got != "ok" {
			t.Fatalf("/fast: %q, %v", got, err)
		}
		time.Sleep(50 * time.Millisecond) // the server saw it idle (ConnState runs after the answer)
	}
	c := dial()
	if got, err := get(c, "/fast"); got != "ok" {
		t.Fatalf("/fast on a third connection over the cap: %q, %v; want it served", got, err)
	}
	if !closed(a) {
		t.Error("the connection idle longest was not closed for the new one")
	}

	// b and c serve requests, b's the longer: a new connection is served
	// in b's place, c goes on.
	fmt.Fprint(b.c, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
	time.Sleep(50 * time.Millisecond) // the server read it
	fmt.Fprint(c.c, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
	time.Sleep(50 * time.Millisecond)
	d := dial()
	if got, err := get(d, "/fast"); got != "ok" {
		t.Fatalf("/fast on a connection over the cap while every connection serves a request: %q, %v; want it served", got, err)
	}
	if !closed(b) {
		t.Error("the connection serving its request longest was not closed for the new one")
	}
	close(release)
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		t.Fatalf("the newer request in progress at the cap: %v, want it answered", err)
	}
	resp.Body.Close()
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
