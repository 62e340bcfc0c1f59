#!/usr/bin/env bash
# loadtest/bench/ghzcompare.sh compares the calls/s of `streamlb loadtest`
# with the ghz command-line tool on the same target in the same run: one
# `streamlb testserver`, one client connection, concurrency 50, CALLS unary
# calls of grpc.testing.TestService/UnaryCall with a 100-byte payload. The two
# generators alternate for ROUNDS rounds and the medians are compared, since a
# shared machine's speed drifts.
#
# Usage: loadtest/bench/ghzcompare.sh
# Knobs (environment): ROUNDS (5), CALLS (20000), PORT (27900), GHZ (path of
# the ghz binary; install it with
#   go install github.com/bojand/ghz/cmd/ghz@v0.121.0).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROUNDS=${ROUNDS:-5}
CALLS=${CALLS:-20000}
PORT=${PORT:-27900}
GHZ=${GHZ:-$(command -v ghz || echo "$(go env GOPATH)/bin/ghz")}
[[ -x $GHZ ]] || { echo "ghz not found; go install github.com/bojand/ghz/cmd/ghz@v0.121.0" >&2; exit 1; }
for tool in jq awk; do
	command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/streamlb-ghzcmp.XXXXXX")
SRV=
cleanup() {
	[[ -n $SRV ]] && kill "$SRV" 2>/dev/null && wait "$SRV" 2>/dev/null
	rm -rf "$WORK"
}
trap cleanup EXIT

(cd "$REPO" && go build -o "$WORK/streamlb" .)
"$WORK/streamlb" testserver --name solo --listen "127.0.0.1:$PORT" --log-level error &
SRV=$!
for _ in $(seq 50); do
	(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
	sleep 0.1
done

# 100 bytes of payload body, base64 for the JSON mapping of bytes.
BODY=$(head -c 100 /dev/zero | tr '\0' 'x' | base64 -w0)
DATA="{\"payload\":{\"body\":\"$BODY\"},\"response_size\":100}"
CALL=grpc.testing.TestService/UnaryCall
TARGET=127.0.0.1:$PORT

run_ghz() {
	"$GHZ" --insecure --call "$CALL" -d "$DATA" -n "$CALLS" -c 50 --connections 1 \
		--format json "$TARGET" | jq '.rps'
}
run_loadtest() {
	"$WORK/streamlb" loadtest --call "$CALL" -d "$DATA" -n "$CALLS" -c 50 --connections 1 \
		--format json "$TARGET" | jq '.rps'
}

: >"$WORK/ghz" ; : >"$WORK/lt"
for r in $(seq "$ROUNDS"); do
	g=$(run_ghz); l=$(run_loadtest)
	echo "round $r: ghz $g calls/s, streamlb loadtest $l calls/s" >&2
	echo "$g" >>"$WORK/ghz"; echo "$l" >>"$WORK/lt"
done
median() { sort -g "$1" | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
G=$(median "$WORK/ghz"); L=$(median "$WORK/lt")
awk -v g="$G" -v l="$L" -v n="$CALLS" -v r="$ROUNDS" 'BEGIN {
	printf "%d unary calls, 1 connection, concurrency 50, median of %d rounds:\n", n, r
	printf "  ghz             %9.1f calls/s\n", g
	printf "  streamlb loadtest %7.1f calls/s  (%.2fx ghz)\n", l, l/g
}'
