package proxy_test

import (
	"context"
	"encoding/xml"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// h2specInstall is how .ci/run installs h2spec; the test names it when
// the binary is missing.
const h2specInstall = "go install github.com/summerwind/h2spec/cmd/h2spec@v2.2.1+incompatible"

// h2specExpected are the h2spec cases the proxy's client side may not
// pass, each with why. They are not HTTP/2 faults: h2spec's requests are
// plain GETs (or POSTs of text), which a gRPC proxy answers at once with
// a trailers-only status (HTTP 405 or 415, and RST_STREAM(NO_ERROR) while
// the request is still open) instead of the response body or the open
// stream those cases wait for. Some pass or not with the order in which
// that answer and h2spec's next frames cross: in 25 strict runs against a
// production build, 5.1.2 failed 22 times, 8.1's case 6, 6.9.1's third
// 5, 5.1's eighth and ninth and 8.1.2.1's third twice each. Any other
// case that does not pass fails the test.
var h2specExpected = map[string]string{
	"generic/2 Sends a WINDOW_UPDATE frame on half-closed (remote) stream": "waits for a DATA response to GET /",
	"generic/2 Sends a PRIORITY frame on half-closed (remote) stream":      "waits for a DATA response to GET /",
	"http2/8.1.2.6 Sends a HEADERS frame with the \"content-length\" header field which does not equal the DATA frame payload length": "a POST of text is answered 415 before its DATA is read; " +
		"TestMalformedRequests checks content-length on gRPC requests",
	"http2/8.1.2.6 Sends a HEADERS frame with the \"content-length\" header field which does not equal the sum of the multiple DATA frames payload length": "as the one before",
	"http2/5.1.2 Sends HEADERS frames that causes their advertised concurrent stream limit to be exceeded":                                                 "each GET is answered and closed at once, so the streams seldom stay open past the limit",
	// Timing: the answer to the request may come before h2spec's next
	// frame is read.
	"http2/5.1 closed: Sends a DATA frame after sending RST_STREAM frame":                                            "timing",
	"http2/5.1 closed: Sends a HEADERS frame after sending RST_STREAM frame":                                         "timing",
	"http2/6.9.1 Sends multiple WINDOW_UPDATE frames increasing the flow control window to above 2^31-1 on a stream": "timing",
	"http2/8.1 Sends a second HEADERS frame without the END_STREAM flag":                                             "timing",
	"http2/8.1.2.1 Sends a HEADERS frame that contains a pseudo-header field as trailers":                            "timing",
	// Skipped by h2spec: each needs a response body to a GET.
	"http2/6.5.3 Sends multiple values of SETTINGS_INITIAL_WINDOW_SIZE":                            "skipped",
	"http2/6.9.1 Sends SETTINGS frame to set the initial window size to 1 and sends HEADERS frame": "skipped",
	"http2/6.9.2 Changes SETTINGS_INITIAL_WINDOW_SIZE after sending HEADERS frame":                 "skipped",
	"http2/6.9.2 Sends a SETTINGS frame for window size to be negative":                            "skipped",
}

// TestH2spec runs h2spec (github.com/summerwind/h2spec), an HTTP/2
// conformance suite nobody here wrote, in its strict mode against the
// proxy's client side over h2c, and requires every case to pass but those
// h2specExpected explains. Skipped when h2spec is not installed, unless
// STREAMLB_REQUIRE_H2SPEC=1 (CI installs it).
func TestH2spec(t *testing.T) {
	bin, err := exec.LookPath("h2spec")
	if err != nil {
		if os.Getenv("STREAMLB_REQUIRE_H2SPEC") == "1" {
			t.Fatalf("h2spec not found (%v); install it with %s", err, h2specInstall)
		}
		t.Skipf("h2spec not installed (%s)", h2specInstall)
	}
	e := newEnv(t, envOpts{backends: 1})
	host, port, err := net.SplitHostPort(e.addr)
	if err != nil {
		t.Fatal(err)
	}
	report := filepath.Join(t.TempDir(), "h2spec.xml")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// -o: how long a case waits for the frame it expects. The cases
	// listed above wait it out, so it sets the run's length (about 6
	// times it); 5 s leaves room for a race-built proxy on a busy machine.
	out, runErr := exec.CommandContext(ctx, bin, "--strict", "-h", host, "-p", port, "-o", "5", "-j", report).CombinedOutput()
	raw, err := os.ReadFile(report)
	if err != nil {
		t.Fatalf("h2spec wrote no report (%v): %v\n%s", runErr, err, out)
	}
	var suites struct {
		Suites []struct {
			Cases []struct {
				Package string     `xml:"package,attr"`
				Name    string     `xml:"classname,attr"`
				Failure *h2specMsg `xml:"failure"`
				Error   *h2specMsg `xml:"error"`
				Skipped *h2specMsg `xml:"skipped"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	if err := xml.Unmarshal(raw, &suites); err != nil {
		t.Fatalf("h2spec report: %v", err)
	}
	var passed, expected int
	for _, s := range suites.Suites {
		for _, c := range s.Cases {
			id := c.Package + " " + c.Name
			if c.Failure == nil && c.Error == nil && c.Skipped == nil {
				passed++
				continue
			}
			if _, ok := h2specExpected[id]; ok {
				expected++
				continue
			}
			t.Errorf("h2spec %s: did not pass: %s%s", id, c.Failure.text(), c.Error.text())
		}
	}
	t.Logf("h2spec: %d cases passed, %d as expected did not (%v)", passed, expected, runErr)
	// The run must have reached the proxy: a refused connection fails
	// every case, which the loop above reports, but a report of nothing
	// would pass it.
	if passed < 100 {
		t.Errorf("h2spec passed only %d cases, want over 100:\n%s", passed, out)
	}
}

// h2specMsg is a failure, error or skip of the report; its text says what
// h2spec expected and got.
type h2specMsg struct {
	Text string `xml:",chardata"`
}

func (m *h2specMsg) text() string {
	if m == nil {
		return ""
	}
	return m.Text
}
