//go:build pbufdebug

package proxy

// pbufDebug turns on the checks of pbufdebug.go.
const pbufDebug = true
