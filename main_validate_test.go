package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/streamlb/streamlb/internal/testkit"
)

// TestValidateCommand checks the validate command's exit codes and
// messages, and that --config refuses the other proxy flags. Not
// parallel: urfave/cli/v2 mutates package globals.
func TestValidateCommand(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("good.yaml", "clusters:\n  - {name: a, targets: [127.0.0.1:1]}\nroutes:\n  - {cluster: a}\n")
	badField := write("bad.yaml", "clusters:\n  - {name: a, targets: [127.0.0.1:1], polcy: random}\nroutes:\n  - {cluster: a}\n")
	badRef := write("ref.yaml", "clusters:\n  - {name: a, targets: [127.0.0.1:1]}\nroutes:\n  - {cluster: b}\n")
	badTLS := write("tls.yaml", "tls: {cert: /nonexistent/a.crt, key: /nonexistent/a.key}\nclusters:\n  - {name: a, targets: [127.0.0.1:1]}\nroutes:\n  - {cluster: a}\n")
	ca := testkit.NewCA(t, "validate CA")
	cert, key := ca.WriteIssued(t, dir, "proxy", true)
	badKey := write("key.yaml", "clusters:\n  - {name: a, targets: [127.0.0.1:1]}\nroutes:\n  - {cluster: a}\ntls:\n  cert: "+cert+"\n  key: "+cert+"\n")
	badClientCA := write("clientca.yaml", "clusters:\n  - {name: a, targets: [127.0.0.1:1]}\nroutes:\n  - {cluster: a}\ntls:\n  cert: "+cert+"\n  key: "+key+"\n  client_ca: /nonexistent/ca.pem\n")
	goodTLS := write("goodtls.yaml", "clusters:\n  - {name: a, targets: [127.0.0.1:1]}\nroutes:\n  - {cluster: a}\ntls:\n  cert: "+cert+"\n  key: "+key+"\n  client_ca: "+ca.WriteCA(t, dir, "ca.pem")+"\n")
	// gRFC A6 needs a ratio above 0: 0 silently meant the default.
	zeroRatio := write("ratio.yaml", "proxy:\n  retry_budget_ratio: 0\nclusters:\n  - {name: a, targets: [127.0.0.1:1]}\nroutes:\n  - {cluster: a}\n")
	zeroClusterRatio := write("cratio.yaml", "clusters:\n  - name: a\n    targets: [127.0.0.1:1]\n    retry: {budget_ratio: 0}\nroutes:\n  - {cluster: a}\n")
	// An unspecified address is no backend: Linux connects it to this host.
	zeroBackend := write("zero.yaml", "clusters:\n  - name: a\n    targets: [127.0.0.1:1, \"[::]:2\"]\nroutes:\n  - {cluster: a}\n")
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
		wantOut  string
		wantErr  string
	}{
		{name: "good", args: []string{"validate", "--config", good}, wantOut: "ok (1 cluster, 1 route)"},
		{name: "unknown field", args: []string{"validate", "--config", badField}, wantCode: 2, wantErr: "line 2: field polcy not found"},
		{name: "unknown cluster", args: []string{"validate", "--config", badRef}, wantCode: 2, wantErr: `line 4: routes[0].cluster: unknown cluster "b"`},
		// The listener's TLS files' errors name the line and the setting,
		// as the others do (they named neither).
		{name: "missing TLS file", args: []string{"validate", "--config", badTLS}, wantCode: 2, wantErr: "line 1: tls: cluster: certificate: open /nonexistent/a.crt"},
		{name: "TLS key not a key", args: []string{"validate", "--config", badKey}, wantCode: 2, wantErr: "line 5: tls: cluster: certificate"},
		{name: "missing client CA", args: []string{"validate", "--config", badClientCA}, wantCode: 2, wantErr: "line 8: tls.client_ca: cluster: client CA: open /nonexistent/ca.pem"},
		{name: "proxy missing TLS file", args: []string{"proxy", "--config", badTLS}, wantCode: 2, wantErr: "line 1: tls: "},
		{name: "good TLS", args: []string{"validate", "--config", goodTLS}, wantOut: "ok (1 cluster, 1 route)"},
		{name: "zero retry budget ratio", args: []string{"validate", "--config", zeroRatio}, wantCode: 2, wantErr: "line 2: proxy.retry_budget_ratio: must be positive"},
		{name: "zero cluster budget ratio", args: []string{"validate", "--config", zeroClusterRatio}, wantCode: 2, wantErr: "line 4: clusters[0].retry.budget_ratio: must be positive"},
		{name: "zero retry budget ratio flag", args: []string{"proxy", "--backend", "127.0.0.1:1", "--retry-budget-ratio", "0"}, wantCode: 2, wantErr: "--retry-budget-ratio must be positive"},
		{name: "unspecified backend", args: []string{"validate", "--config", zeroBackend}, wantCode: 2, wantErr: `line 3: clusters[0].targets: resolver: target "[::]:2": unspecified IP :: is not a backend address`},
		{name: "unspecified backend flag", args: []string{"proxy", "--backend", "0.0.0.0:9090"}, wantCode: 2, wantErr: `--backend: resolver: target "0.0.0.0:9090": unspecified IP 0.0.0.0 is not a backend address`},
		{name: "missing file", args: []string{"validate", "--config", filepath.Join(dir, "none.yaml")}, wantCode: 2, wantErr: "none.yaml"},
		{name: "no config", args: []string{"validate"}, wantCode: 2, wantErr: "--config FILE"},
		{name: "config and flags", args: []string{"proxy", "--config", good, "--backend", "127.0.0.1:2"}, wantCode: 2, wantErr: "--backend cannot be used with --config"},
		{name: "proxy bad config", args: []string{"proxy", "--config", badRef}, wantCode: 2, wantErr: "unknown cluster"},
		// The contention profiles are the process's: allowed beside
		// --config (the file is read, and refused for its own error).
		{name: "profiles beside config", args: []string{"proxy", "--config", badRef, "--mutex-profile-fraction", "5", "--block-profile-rate", "1000"}, wantCode: 2, wantErr: "unknown cluster"},
		{name: "negative mutex profile fraction", args: []string{"proxy", "--backend", "127.0.0.1:1", "--mutex-profile-fraction", "-1"}, wantCode: 2, wantErr: "must not be negative"},
		{name: "negative block profile rate", args: []string{"proxy", "--config", good, "--block-profile-rate", "-1"}, wantCode: 2, wantErr: "must not be negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			app := newApp()
			app.Writer, app.ErrWriter = &stdout, &stderr
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			err := app.RunContext(ctx, append([]string{"streamlb"}, tc.args...))
			if got := exitCode(err); got != tc.wantCode {
				t.Errorf("exit code = %d (err %v), want %d", got, err, tc.wantCode)
			}
			if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Errorf("error = %v, want it to contain %q", err, tc.wantErr)
			}
			if !strings.Contains(stdout.String(), tc.wantOut) {
				t.Errorf("stdout = %q, want it to contain %q", stdout.String(), tc.wantOut)
			}
		})
	}
}
