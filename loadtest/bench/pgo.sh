#!/usr/bin/env bash
# loadtest/bench/pgo.sh writes default.pgo, the CPU profile that `go build`
# uses for profile-guided optimization of the streamlb binary (Go reads
# default.pgo from the main package's directory: -pgo=auto). The profile
# is the production build's (without PGO) under the three workloads of
# run.sh, one after the other, each SECS long: unary calls at full speed,
# unary calls at 2,000 calls/s, 1 MiB server streams; the proxy pinned to
# CPU 0 with metrics on and /metrics scraped each second, three
# testservers and the generator on CPU 1, as in run.sh. The three CPU
# profiles, taken from the admin listener's /debug/pprof/profile, are
# merged into one.
#
#   loadtest/bench/pgo.sh            # writes ./default.pgo
#
# Knobs (environment): SECS (20), BASE_PORT (25400; uses BASE_PORT+1..3
# for the backends, +10 and +11 for the proxy and its admin listener),
# WORK (a scratch directory, mktemp by default), OUT (default.pgo at the
# repository's root). Rerun it when the data path changes much; a stale
# profile costs only the optimization, never correctness.
set -euo pipefail
SECS=${SECS:-20} PB=${BASE_PORT:-25400}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$REPO/loadtest/bench
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/pgo.XXXXXX")}
OUT=${OUT:-$REPO/default.pgo}
# shellcheck source=loadtest/bench/lib.sh
source "$HERE/lib.sh"
(cd "$REPO" && CGO_ENABLED=0 go build -pgo=off -tags proxyonly,grpcnotrace,urfave_cli_no_docs -o "$WORK/streamlb-prod" . &&
	go build -pgo=off -o "$WORK/streamlb" . && go build -o "$WORK/gen" ./loadtest/bench/gen)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
start_backends "$WORK/streamlb" "$PB" "$WORK/testserver.log"
backends_up "$PB" "$WORK/testserver.log" || exit 1
taskset -c 0 "$WORK/streamlb-prod" proxy --listen 127.0.0.1:$((PB + 10)) \
	--backend 127.0.0.1:$((PB + 1)) --backend 127.0.0.1:$((PB + 2)) --backend 127.0.0.1:$((PB + 3)) \
	--metrics=true --admin-listen 127.0.0.1:$((PB + 11)) --log-level warn &
pids+=($!)
for _ in $(seq 50); do up $((PB + 11)) && break; sleep 0.2; done
taskset -c 0 bash -c "$(declare -f scraper); scraper \"\$@\"" _ "$WORK/scrape" $((PB + 11)) &
pids+=($!)
taskset -c 1 "$WORK/gen" -c 50 -n 3000 -target 127.0.0.1:$((PB + 10)) >/dev/null # warm-up
# profile NAME GEN_FLAGS...: a CPU profile of the proxy over SECS of the workload.
profile() {
	local name=$1 prof
	shift
	exec {prof}< <(curl -sf "http://127.0.0.1:$((PB + 11))/debug/pprof/profile?seconds=$SECS" >"$WORK/$name.pprof"; echo done)
	sleep 0.3
	taskset -c 1 "$WORK/gen" "$@" -duration "${SECS}s" -n 100000000 -target 127.0.0.1:$((PB + 10)) >"$WORK/$name.json"
	read -r -u "$prof" _ # the profile is written
	exec {prof}<&-
	[[ -s $WORK/$name.pprof ]] || { echo "pgo: no $name profile" >&2; exit 1; }
	echo "pgo: $name: $(grep -o '"count":[0-9]*' "$WORK/$name.json" | head -1 | cut -d: -f2) calls"
}
profile unary -c 50
profile rate2000 -c 50 -rate 2000
profile stream -stream -c 4
go tool pprof -proto "$WORK/unary.pprof" "$WORK/rate2000.pprof" "$WORK/stream.pprof" >"$OUT"
echo "pgo: wrote $OUT ($(wc -c <"$OUT") bytes)"
