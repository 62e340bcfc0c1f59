//go:build !unix

package main

import "time"

// processCPU is -1 where getrusage(2) is missing: the report leaves out
// the generator's CPU.
func processCPU() time.Duration { return -1 }
