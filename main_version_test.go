package main

import (
	"runtime/debug"
	"strings"
	"testing"
)

func TestBuildVersion(t *testing.T) {
	info := func(version string, settings ...string) func() (*debug.BuildInfo, bool) {
		bi := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: version}}
		for i := 0; i+1 < len(settings); i += 2 {
			bi.Settings = append(bi.Settings, debug.BuildSetting{Key: settings[i], Value: settings[i+1]})
		}
		return func() (*debug.BuildInfo, bool) { return bi, true }
	}
	tests := []struct {
		name     string
		read     func() (*debug.BuildInfo, bool)
		ldflags  string
		want     string
		wantPart string
	}{
		{name: "stamped", read: info("v0.3.0", "vcs.revision", "abc123", "vcs.time", "2026-12-02T10:00:00Z", "vcs.modified", "false"),
			want: "v0.3.0 revision abc123 (2026-12-02T10:00:00Z) go1.26.8"},
		{name: "modified tree", read: info("(devel)", "vcs.revision", "abc123", "vcs.time", "2026-12-02T10:00:00Z", "vcs.modified", "true"),
			want: "(devel) revision abc123 (2026-12-02T10:00:00Z, modified) go1.26.8"},
		{name: "ldflags revision", read: info("(devel)"), ldflags: "def456", want: "(devel) revision def456 go1.26.8"},
		{name: "not stamped", read: info("(devel)"), wantPart: "no VCS revision stamped"},
		{name: "no build info", read: func() (*debug.BuildInfo, bool) { return nil, false }, want: "unknown (no build info)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			prev := revision
			revision = tc.ldflags
			defer func() { revision = prev }()
			got := buildVersion(tc.read)
			if tc.want != "" && got != tc.want {
				t.Errorf("buildVersion() = %q, want %q", got, tc.want)
			}
			if tc.wantPart != "" && !strings.Contains(got, tc.wantPart) {
				t.Errorf("buildVersion() = %q, want it to contain %q", got, tc.wantPart)
			}
		})
	}
}
