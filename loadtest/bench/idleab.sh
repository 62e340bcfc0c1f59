#!/usr/bin/env bash
# loadtest/bench/idleab.sh compares the RSS per idle client connection of
# streamlb builds, alternating them round by round on a shared machine:
# for each round and each LABEL=BINARY, a fresh frame proxy (the defaults:
# metrics on, an admin listener, as run.sh's idle step runs it) on CPU 0,
# and loadtest/bench/idleconns on CPU 1 opening N idle HTTP/2 connections
# to it and reading VmRSS and RssAnon before and after.
#
# Usage: loadtest/bench/idleab.sh ROUNDS N LABEL=BINARY [LABEL=BINARY ...]
# e.g.   loadtest/bench/idleab.sh 3 5000 old=/tmp/streamlb-old new=/tmp/streamlb-new
# The backend is a testserver run from the first binary, or from
# BACKEND_BIN if set (a full build: a proxyonly build has no testserver
# command); ports from BASE_PORT (27390) up. SETTLE (2s) is idleconns'
# wait after the last handshake before the second reading; a frame proxy
# parks idle connections' readers 1-3 s after they go quiet
# (Config.ParkAfter), so SETTLE=5s measures them parked.
# TLS_DIR, if set, holds server.crt, server.key (for localhost) and the
# ca.crt that signed them (as run.sh makes): the proxies terminate TLS with
# them and the connections speak TLS. CALL (a method path, e.g.
# /grpc.testing.TestService/EmptyCall) has each connection make one call
# first (idleconns -call).
set -euo pipefail
(($# >= 3)) || { sed -n '2,21p' "$0"; exit 2; }
ROUNDS=$1 N=$2
shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BASE_PORT=${BASE_PORT:-27390}
SETTLE=${SETTLE:-2s}
TLSFLAGS=() CLIENTFLAGS=()
if [[ -n ${TLS_DIR:-} ]]; then
	TLSFLAGS=(--tls-cert "$TLS_DIR/server.crt" --tls-key "$TLS_DIR/server.key")
	CLIENTFLAGS=(-cacert "$TLS_DIR/ca.crt" -servername localhost)
fi
[[ -n ${CALL:-} ]] && CLIENTFLAGS+=(-call "$CALL")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/streamlb-idleab.XXXXXX")
(cd "$REPO" && go build -o "$WORK/idleconns" ./loadtest/bench/idleconns)
PIN0=() PIN1=()
if command -v taskset >/dev/null && (($(nproc) >= 2)); then PIN0=(taskset -c 0) PIN1=(taskset -c 1); fi
"${PIN1[@]}" "${BACKEND_BIN:-${1#*=}}" testserver --listen "127.0.0.1:$BASE_PORT" --name b1 --log-level warn >"$WORK/backend.log" 2>&1 &
TS=$!
trap 'kill $TS 2>/dev/null || true' EXIT
sleep 1
port=$BASE_PORT
for r in $(seq 1 "$ROUNDS"); do
	for lb in "$@"; do
		label=${lb%%=*} bin=${lb#*=}
		port=$((port + 2))
		"${PIN0[@]}" "$bin" proxy --listen "127.0.0.1:$port" --backend "127.0.0.1:$BASE_PORT" --engine frame \
			--admin-listen "127.0.0.1:$((port + 1))" "${TLSFLAGS[@]}" --log-level warn >"$WORK/$label.log" 2>&1 &
		P=$!
		sleep 1 # let the fresh process settle before the first reading
		if out=$("${PIN1[@]}" "$WORK/idleconns" -target "127.0.0.1:$port" -pid "$P" -n "$N" -settle "$SETTLE" "${CLIENTFLAGS[@]}" 2>"$WORK/$label.err"); then
			jq -r --arg l "$label" --arg r "$r" '"round \($r) \($l): \(.open_at_end)/\(.conns) open; VmRSS \(.rss_before_kib) -> \(.rss_after_kib) KiB, \(.kib_per_conn * 100 | round / 100) KiB per connection; RssAnon \(.rss_anon_before_kib) -> \(.rss_anon_after_kib) KiB, \(.anon_kib_per_conn * 100 | round / 100) KiB per connection"' <<<"$out"
		else
			echo "round $r $label: failed: $(head -c 300 "$WORK/$label.err")"
		fi
		kill "$P" 2>/dev/null || true
		wait "$P" 2>/dev/null || true
	done
done
