//go:build !pbufdebug

package proxy

// pbufDebug turns on the checks of pbufdebug.go: see there.
const pbufDebug = false
