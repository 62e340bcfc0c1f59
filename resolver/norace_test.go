//go:build !race

package resolver

// raceEnabled reports whether the tests run under the race detector.
const raceEnabled = false
