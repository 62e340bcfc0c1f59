//go:build pbufdebug

package proxy_test

// atk5HeapSlack is the heap growth atk5Resources allows, in MiB: the
// checking mode keeps up to 16 MiB of freed buffers and their stacks.
const atk5HeapSlack = 48
