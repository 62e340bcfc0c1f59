package cluster

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// A static binary's mappings, as /proc/PID/maps writes them, with a
// second file of the same inode on another device and a shared mapping of
// the binary.
const testMaps = `00400000-00be7000 r-xp 00000000 fe:00 9979946                            /srv/streamlb
00be7000-01544000 r--p 007e7000 fe:00 9979946                            /srv/streamlb
01544000-015c7000 rw-p 01144000 fe:00 9979946                            /srv/streamlb
015c7000-0360d000 rw-p 00000000 00:00 0 
02000000-02001000 r--s 00000000 fe:00 9979946                            /srv/streamlb
03000000-03100000 r--p 00000000 08:01 9979946                            /other/disk/file
16492d000000-16492e000000 rw-p 00000000 00:00 0 
7ffd99b81000-7ffd99ba2000 rw-p 00000000 00:00 0                          [stack]
7f8ef4a07000-7f8ef4a09000 r-xp 00000000 00:00 0                          [vdso]
`

func TestExeMappings(t *testing.T) {
	t.Parallel()
	text := mapping{start: 0x400000, end: 0xbe7000, perms: "r-xp", dev: "fe:00", inode: 9979946}
	rodata := mapping{start: 0xbe7000, end: 0x1544000, perms: "r--p", dev: "fe:00", inode: 9979946}
	tests := []struct {
		name    string
		maps    string
		pc      uint64
		want    []mapping
		wantErr string
	}{
		{name: "code and read-only data, not data, shared or others", maps: testMaps, pc: 0x496240, want: []mapping{text, rodata}},
		{name: "first byte of text", maps: testMaps, pc: 0x400000, want: []mapping{text, rodata}},
		{name: "deleted binary", maps: strings.ReplaceAll(testMaps, "/srv/streamlb", "/srv/streamlb (deleted)"), pc: 0x496240, want: []mapping{text, rodata}},
		{name: "pc in no file mapping", maps: testMaps, pc: 0x16492d000100, wantErr: "no file mapping holds"},
		{name: "pc past the end", maps: testMaps, pc: 0xbe7000 - 1, want: []mapping{text, rodata}},
		{name: "pc in the vdso", maps: testMaps, pc: 0x7f8ef4a07000, wantErr: "no file mapping holds"},
		{name: "empty", maps: "", pc: 0x400000, wantErr: "no file mapping holds"},
		{name: "too few fields", maps: "00400000-00be7000 r-xp 00000000 fe:00\n", pc: 0x400000, wantErr: "too few fields"},
		{name: "no range", maps: "00400000 r-xp 00000000 fe:00 1 /x\n", pc: 0x400000, wantErr: "bad range"},
		{name: "bad hex", maps: "0040000g-00be7000 r-xp 00000000 fe:00 1 /x\n", pc: 0x400000, wantErr: "invalid syntax"},
		{name: "end before start", maps: "00be7000-00400000 r-xp 00000000 fe:00 1 /x\n", pc: 0x400000, wantErr: "end before start"},
		{name: "bad inode", maps: "00400000-00be7000 r-xp 00000000 fe:00 x /x\n", pc: 0x400000, wantErr: "invalid syntax"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := exeMappings(strings.NewReader(tc.maps), tc.pc)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("exeMappings: err %v, want one containing %q (got %v)", err, tc.wantErr, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("exeMappings: %v", err)
			}
			if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(mapping{})); diff != "" {
				t.Errorf("exeMappings (-want +got):\n%s", diff)
			}
		})
	}
}

// FuzzExeMappings checks that no input panics, and that whatever is
// returned is a read-only private mapping of the file that holds pc: the
// only mappings ReleaseStartupPages may drop.
func FuzzExeMappings(f *testing.F) {
	f.Add(testMaps, uint64(0x496240))
	f.Add("00400000-00be7000 r-xp 00000000 fe:00 1 /x\n00be7000-00c00000 rw-p 0 fe:00 1 /x\n", uint64(0x400000))
	f.Add("0-1 rwxs 0 0:0 1\n", uint64(0))
	f.Fuzz(func(t *testing.T, maps string, pc uint64) {
		got, err := exeMappings(strings.NewReader(maps), pc)
		if err != nil {
			return
		}
		var exe *mapping
		for _, line := range strings.Split(maps, "\n") {
			m, ok, err := parseMapsLine([]byte(line))
			if err == nil && ok && m.start <= pc && pc < m.end {
				exe = &m
			}
		}
		if exe == nil {
			t.Fatalf("exeMappings returned %v, but no mapping holds %#x", got, pc)
		}
		for _, m := range got {
			if m.perms[1] == 'w' || m.perms[3] != 'p' || m.dev != exe.dev || m.inode != exe.inode || m.end < m.start {
				t.Errorf("exeMappings returned %+v for the file %s %d", m, exe.dev, exe.inode)
			}
		}
	})
}
