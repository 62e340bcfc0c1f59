// Package loadtest drives load through the proxy and reports where calls
// landed.
//
// Behind the proxy a client sees only the proxy's address, so attribution
// comes from the backends themselves: every testserver names itself in the
// x-backend response header (testserver.HeaderBackend), and the report counts
// calls per name.
//
// Today the package holds the self-contained demo behind `streamlb demo`
// (RunDemo): three testservers, the frame proxy with round robin in front,
// and one client connection carrying every call. Because the demo builds its
// own proxy, this package imports proxy, director and resolver besides
// testserver; main still does the wiring of the real proxy command. A load
// command driven by ghz, and a demo against DNS-discovered backends, are
// later additions.
//
// The package leaves balancing to the director and relaying to the proxy; it
// only sends calls and counts answers.
package loadtest
