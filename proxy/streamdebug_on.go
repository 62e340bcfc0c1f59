//go:build streamdebug

package proxy

// streamDebug turns on the checks of streamdebug.go.
const streamDebug = true
