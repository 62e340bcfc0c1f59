//go:build !pbufdebug

package proxy_test

// atk5HeapSlack is the heap growth atk5Resources allows, in MiB.
const atk5HeapSlack = 16
