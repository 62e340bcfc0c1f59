package cluster

// Start-up pages of the binary.
//
// Linux maps a static Go binary's code (.text) and read-only data
// (.rodata, .gopclntab) from its file, and a page, once touched, stays in
// the process's page tables, counted in its RSS (RssFile), whether it is
// used again or not. The kernel also maps the pages around each fault
// (fault-around, 64 KiB by default), so the package initialisation of
// every linked package, the flag parsing and the wiring leave nearly the
// whole binary resident: about 15 MiB of the production build's 18 MiB of
// code and tables, idle, of which a serving proxy uses about two thirds
// (BENCHMARKS.md, "Memory: start-up pages"). Dropping those mappings once, when
// start-up is over, lets RSS count what the running proxy touches again.
//
// Dropping the mappings alone leaves start-up's pages in the page cache,
// and fault-around maps whatever the page cache holds around a fault: the
// running proxy's RSS grew back to about 10 MiB of the binary, though it
// touches about 4 (smaps' Referenced after clear_refs, under the
// benchmark's workloads). So the release also drops the executable's
// pages that no process maps from the page cache and marks the mappings
// for random access (no readahead): a page touched again is read from
// the file, one page per fault, a major fault instead of a minor one, once
// per page for the life of the process (about 190 for the first call
// through a new proxy, 160 for the first /metrics scrape; 0.1-0.5 ms in
// all on this machine's virtual disk). Nothing is lost: only read-only
// private mappings of the executable are dropped, never a writable one
// (.data, .bss, whose contents the program changed), the heap or stacks;
// and only clean, unmapped page-cache pages, which the kernel drops under
// memory pressure anyway.

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"strconv"
)

// mapping is one line of /proc/PID/maps reduced to what releasing needs.
type mapping struct {
	start, end uint64
	perms      string // "r-xp"
	dev        string // "fe:00"
	inode      uint64
}

// exeMappings parses /proc/PID/maps and returns the read-only private
// mappings of the file that the mapping holding pc maps: with pc an
// address of the program's own code, the executable's code and read-only
// data. The file is told by device and inode, which is right even where
// the path is not (a replaced or removed binary, overlay filesystems).
func exeMappings(r io.Reader, pc uint64) ([]mapping, error) {
	var all []mapping
	var exe *mapping
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 0, 4096), 1<<20) // a line holds a path of up to PATH_MAX
	for s.Scan() {
		m, ok, err := parseMapsLine(s.Bytes())
		if err != nil {
			return nil, err
		}
		if ok {
			all = append(all, m)
			if m.start <= pc && pc < m.end {
				exe = &all[len(all)-1]
			}
		}
	}
	if err := s.Err(); err != nil {
		return nil, fmt.Errorf("read maps: %w", err)
	}
	if exe == nil {
		return nil, fmt.Errorf("no file mapping holds the program's code at %#x", pc)
	}
	dev, ino := exe.dev, exe.inode
	var out []mapping
	for _, m := range all {
		// Only private, not writable: dropping a written private page
		// would lose what was written, and a shared mapping's pages are
		// not ours alone.
		if m.dev == dev && m.inode == ino && len(m.perms) == 4 && m.perms[1] != 'w' && m.perms[3] == 'p' {
			out = append(out, m)
		}
	}
	return out, nil
}

// parseMapsLine parses "start-end perms offset dev inode [path]". ok is
// false for a line without a file (inode 0).
func parseMapsLine(line []byte) (m mapping, ok bool, err error) {
	f := bytes.Fields(line)
	if len(f) < 5 {
		return m, false, fmt.Errorf("maps line %q: too few fields", line)
	}
	start, end, found := bytes.Cut(f[0], []byte("-"))
	if !found {
		return m, false, fmt.Errorf("maps line %q: bad range", line)
	}
	if m.start, err = strconv.ParseUint(string(start), 16, 64); err != nil {
		return m, false, fmt.Errorf("maps line %q: %w", line, err)
	}
	if m.end, err = strconv.ParseUint(string(end), 16, 64); err != nil {
		return m, false, fmt.Errorf("maps line %q: %w", line, err)
	}
	if m.end < m.start {
		return m, false, fmt.Errorf("maps line %q: end before start", line)
	}
	if m.inode, err = strconv.ParseUint(string(f[4]), 10, 64); err != nil {
		return m, false, fmt.Errorf("maps line %q: %w", line, err)
	}
	m.perms, m.dev = string(f[1]), string(f[3])
	return m, m.inode != 0, nil
}
