#!/usr/bin/env bash
# loadtest/bench/statuspage.sh takes screenshots of the admin status page in
# headless Chromium, under load, on 127.0.0.1 only: four testservers (one
# slow, one failing 10% of calls, one stopped halfway so health checks mark
# it down), streamlb in front with --admin-listen, and steady load from
# `streamlb loadtest`. Not run by CI; needs a `chromium` binary (Debian:
# apt-get install chromium).
#
# Usage: loadtest/bench/statuspage.sh [OUTDIR]   (default /tmp; writes
#        status-1.png, status-2.png and status-nometrics.png)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-/tmp}
PORT=${BASE_PORT:-27400}
WORK=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT

(cd "$REPO" && go build -o "$WORK/streamlb" .)
bin=$WORK/streamlb

backend() { # name port [testserver flags]
	local name=$1 port=$2
	shift 2
	"$bin" testserver --name "$name" --listen "127.0.0.1:$port" --log-level warn "$@" &
	pids+=($!)
}
backend a $((PORT + 1))
backend b $((PORT + 2)) --latency 15ms
backend c $((PORT + 3)) --error-rate 0.1
backend d $((PORT + 4))
d_pid=${pids[-1]}

shoot() { # url png
	chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
		--disable-background-networking --disable-component-update --disable-sync \
		--user-data-dir="$(mktemp -d -p "$WORK")" --virtual-time-budget=8000 \
		--window-size=1200,800 --screenshot="$2" "$1" 2>/dev/null
	echo "wrote $2"
}

proxy() { # listen-port admin-port [proxy flags]
	local port=$1 admin=$2
	shift 2
	"$bin" proxy --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --log-level warn \
		--health-check-interval 500ms --eject-after 5 \
		--backend "127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2)),127.0.0.1:$((PORT + 3)),127.0.0.1:$((PORT + 4))" "$@" &
	pids+=($!)
	until curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null; do sleep 0.2; done
}
proxy $((PORT + 10)) $((PORT + 11))
proxy $((PORT + 20)) $((PORT + 21)) --metrics=false

"$bin" loadtest --target "127.0.0.1:$((PORT + 10))" --call grpc.testing.TestService/UnaryCall \
	--duration 25s --rps 400 -c 16 >/dev/null 2>&1 &
pids+=($!)
"$bin" loadtest --target "127.0.0.1:$((PORT + 20))" --call grpc.testing.TestService/UnaryCall \
	--duration 25s --rps 100 -c 4 >/dev/null 2>&1 &
pids+=($!)

sleep 8
shoot "http://127.0.0.1:$((PORT + 11))/" "$OUT/status-1.png"
kill "$d_pid"
sleep 6
shoot "http://127.0.0.1:$((PORT + 11))/" "$OUT/status-2.png"
shoot "http://127.0.0.1:$((PORT + 21))/" "$OUT/status-nometrics.png"
