package proxy_test

import (
	"context"
	"slices"
	"testing"

	"github.com/streamlb/streamlb/proxy"
)

// TestNewLeavesPickMetadataAlone checks New lower-cases its own copy of
// Config.PickMetadata, not the caller's slice.
func TestNewLeavesPickMetadataAlone(t *testing.T) {
	t.Parallel()
	keys := []string{"X-User", "x-tenant", "X-Request-ID"}
	want := slices.Clone(keys)
	_, err := proxy.New(proxy.Config{
		Picker: proxy.PickerFunc(func(context.Context, string) (string, func(error), error) {
			return "", nil, nil
		}),
		PickMetadata: keys,
		Logger:       quietLog,
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if !slices.Equal(keys, want) {
		t.Errorf("caller's PickMetadata = %q after New; want %q unchanged", keys, want)
	}
}
