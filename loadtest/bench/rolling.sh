#!/usr/bin/env bash
# loadtest/bench/rolling.sh measures, from outside, what backend restarts
# cost the clients of a proxy (issue 9, "Backend faults"). Three
# `streamlb testserver` backends sit behind
#
#   streamlb        streamlb proxy with its default flags
#   streamlb-retry  the same with --retry-on /grpc.testing.TestService/
#                   (every TestService method is idempotent), as a user
#                   who wants retries would run it
#   streamlb-hc     the default flags plus --health-check-interval 1s
#                   (not in the default PATHS)
#   haproxy         HAProxy, mode http, h2c on both sides, with retries,
#                   redispatch and a TCP check (haproxy-rolling.cfg says
#                   what is set and why)
#
# and one load generator (loadtest/bench/gen, plain grpc-go) sends
# continuous unary calls (concurrency CONC) and a few server streams
# (STREAM_WORKERS workers, 16 x 64 KiB each) over ONE client connection to
# the proxy. Two scenarios run under that load:
#
#   rolling  each backend in turn is restarted the way Kubernetes does it:
#            SIGTERM (the testserver reports NOT_SERVING, sends GOAWAY,
#            finishes its calls and exits, like grpc-go's GracefulStop),
#            wait for the exit, a new process on the same address 0.5 s
#            later, GAP seconds, the next one
#   kill     one backend is killed with SIGKILL and restarted 1 s later;
#            only the calls in flight on it may fail, with UNAVAILABLE
#
# Each run gets a fresh proxy process, so no run inherits another's
# ejections. After the last restart the generator is told (SIGUSR1) to
# count the next TAIL seconds on their own: the "after" split shows
# whether the restarted backends are back in the rotation. The report
# gives, for every run, the calls made, the failed calls by gRPC status
# code and by kind, and the after split; then totals per path and
# scenario; then, for each kill, the time from the killed backend's new
# process being launched to the first call it answered.
#
# The proxy under test is pinned to CPU 0, the generator and the backends
# to CPU 1, as in run.sh. Everything listens on 127.0.0.1; every process
# the script starts is stopped on exit (trap), and the whole script runs
# in about 3.5 minutes with the defaults (under 5).
#
# Usage: loadtest/bench/rolling.sh   (as root it installs haproxy with
#                                      apt-get if missing)
# Knobs (environment): RUNS (3), PATHS ("streamlb streamlb-retry haproxy"),
# SCENARIOS ("rolling kill"), CONC (50), STREAM_WORKERS (2), LEAD (2: seconds
# of load before the first restart), GAP (2: seconds between a backend's
# return and the next restart), TAIL (3: seconds of the after window),
# LOG_LEVEL (info; debug for the proxy's retry and ejection decisions),
# BASE_PORT (28100), OUT (results file; default in the work dir), KEEP_WORK
# (1 keeps the work dir with logs and raw JSON).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
RUNS=${RUNS:-3}
PATHS=${PATHS:-"streamlb streamlb-retry haproxy"}
SCENARIOS=${SCENARIOS:-"rolling kill"}
CONC=${CONC:-50}
STREAM_WORKERS=${STREAM_WORKERS:-2}
LEAD=${LEAD:-2}
GAP=${GAP:-2}
TAIL=${TAIL:-3}
LOG_LEVEL=${LOG_LEVEL:-info}
BASE_PORT=${BASE_PORT:-28100}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/streamlb-rolling.XXXXXX")
OUT=${OUT:-$WORK/results.md}
KEEP_WORK=${KEEP_WORK:-1}
START_TIME=$(date +%s)
# A run's generator is bounded by this, whatever happens to the restarts.
GEN_MAX_SECS=60

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
# BPID holds the current process of each backend, PROXY_PID and GEN_PID
# those of the run in progress; cleanup stops whatever is still running.
declare -A BPID=()
PROXY_PID= GEN_PID=
cleanup() {
	local status=$?
	trap - EXIT INT TERM
	local pids=("${BPID[@]}" $PROXY_PID $GEN_PID) pid
	for pid in "${pids[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${pids[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	if [[ $KEEP_WORK != 1 ]]; then
		rm -rf "$WORK"
	fi
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- setup
for tool in jq taskset ss; do
	command -v "$tool" >/dev/null || die "$tool is required"
done
command -v go >/dev/null || die "go is required to build streamlb"
for v in RUNS CONC STREAM_WORKERS LEAD GAP TAIL BASE_PORT; do
	[[ ${!v} =~ ^[0-9]+$ ]] || die "$v=${!v}: want a whole number"
done
((RUNS >= 1 && CONC >= 1)) || die "RUNS and CONC must be at least 1"

if (($(nproc) >= 2)); then
	PIN_PROXY=(taskset -c 0)
	PIN_LOAD=(taskset -c 1)
	PINNING="proxy under test on CPU 0; load generator and the 3 backends on CPU 1"
else
	PIN_PROXY=()
	PIN_LOAD=()
	PINNING="not pinned: only $(nproc) CPU"
fi

log "work dir $WORK"
log "building streamlb and the load generator"
(cd "$REPO" && go build -o "$WORK/streamlb" . && go build -o "$WORK/gen" ./loadtest/bench/gen) ||
	die "go build failed"
BIN=$WORK/streamlb
GEN=$WORK/gen

for path in $PATHS; do
	case $path in
	streamlb | streamlb-retry | streamlb-hc) ;;
	haproxy)
		if ! command -v haproxy >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
			log "installing haproxy"
			{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy ||
				{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy; }; } \
				>"$WORK/apt-haproxy.log" 2>&1 || true
		fi
		command -v haproxy >/dev/null || die "haproxy is not installed (run as root, or apt-get install haproxy; or leave it out of PATHS)"
		;;
	*) die "unknown path $path (known: streamlb streamlb-retry streamlb-hc haproxy)" ;;
	esac
done
for s in $SCENARIOS; do
	[[ $s == rolling || $s == kill ]] || die "unknown scenario $s (known: rolling kill)"
done

# wait_port waits up to 10s for 127.0.0.1:$1 to accept connections.
wait_port() {
	local port=$1 i
	for ((i = 0; i < 100; i++)); do
		if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
			return 0
		fi
		sleep 0.1
	done
	return 1
}

# owned_port succeeds if process $2 listens on 127.0.0.1:$1.
owned_port() {
	ss -Htlnp "sport = :$1" 2>/dev/null | grep -q "pid=$2,"
}

# wait_exit waits up to $2 seconds for child $1 to exit and sets WAIT_RC to
# its exit status; past that it kills it and sets WAIT_RC to "killed". (Not
# in a $(...) subshell: only this shell can wait for its children.)
WAIT_RC=
wait_exit() {
	local pid=$1 bound=$2 i
	for ((i = 0; i < bound * 20; i++)); do
		if ! kill -0 "$pid" 2>/dev/null; then
			WAIT_RC=0
			wait "$pid" 2>/dev/null || WAIT_RC=$?
			return 0
		fi
		sleep 0.05
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	WAIT_RC=killed
}

port_of() { echo $((BASE_PORT + $1)); }
PROXY_PORT=$((BASE_PORT + 10))

# start_backend starts backend $1 (1..3) on its port; $2 tags its log.
start_backend() {
	local i=$1 port
	port=$(port_of "$i")
	"${PIN_LOAD[@]}" "$BIN" testserver --listen "127.0.0.1:$port" --name "b$i" \
		--log-level info >>"$WORK/backend-$i.log" 2>&1 &
	BPID[$i]=$!
	wait_port "$port" || die "backend b$i did not start listening on $port (see $WORK/backend-$i.log)"
	owned_port "$port" "${BPID[$i]}" || die "port $port is held by another process (BASE_PORT=$BASE_PORT)"
}

for i in 1 2 3; do
	start_backend "$i"
done
BACKENDS=(--backend "127.0.0.1:$(port_of 1)" --backend "127.0.0.1:$(port_of 2)" --backend "127.0.0.1:$(port_of 3)")

# start_proxy starts path $1 for run tag $2 and sets PROXY_PID.
start_proxy() {
	local path=$1 tag=$2
	case $path in
	streamlb)
		"${PIN_PROXY[@]}" "$BIN" proxy --listen "127.0.0.1:$PROXY_PORT" "${BACKENDS[@]}" \
			--log-level "$LOG_LEVEL" >"$WORK/$tag.proxy.log" 2>&1 &
		;;
	streamlb-hc)
		"${PIN_PROXY[@]}" "$BIN" proxy --listen "127.0.0.1:$PROXY_PORT" "${BACKENDS[@]}" \
			--health-check-interval 1s --log-level "$LOG_LEVEL" >"$WORK/$tag.proxy.log" 2>&1 &
		;;
	streamlb-retry)
		"${PIN_PROXY[@]}" "$BIN" proxy --listen "127.0.0.1:$PROXY_PORT" "${BACKENDS[@]}" \
			--retry-on /grpc.testing.TestService/ --log-level "$LOG_LEVEL" >"$WORK/$tag.proxy.log" 2>&1 &
		;;
	haproxy)
		sed -e "s|@PORT@|$PROXY_PORT|g" -e "s|@B1@|$(port_of 1)|g" -e "s|@B2@|$(port_of 2)|g" \
			-e "s|@B3@|$(port_of 3)|g" -e "s|@DIR@|$WORK|g" -e "s|@NAME@|$tag|g" \
			"$HERE/haproxy-rolling.cfg" >"$WORK/$tag.cfg"
		haproxy -c -q -f "$WORK/$tag.cfg" >"$WORK/$tag.check.log" 2>&1 ||
			die "haproxy config check failed: $(head -c 300 "$WORK/$tag.check.log")"
		"${PIN_PROXY[@]}" haproxy -db -f "$WORK/$tag.cfg" >"$WORK/$tag.proxy.log" 2>&1 &
		;;
	esac
	PROXY_PID=$!
	wait_port "$PROXY_PORT" || die "$path did not start listening (see $WORK/$tag.proxy.log)"
	owned_port "$PROXY_PORT" "$PROXY_PID" || die "port $PROXY_PORT is held by another process"
}

# restart_backend stops backend $1 with signal $2, waits for it to exit,
# waits $3 seconds and starts a new one on the same address; it logs what
# happened to $4.
restart_backend() {
	local i=$1 sig=$2 delay=$3 events=$4 t0 t1 rc
	t0=$(date +%s.%N)
	kill "-$sig" "${BPID[$i]}"
	# (2>/dev/null: bash's "Killed" notice for the SIGKILL variant.)
	wait_exit "${BPID[$i]}" 15 2>/dev/null
	rc=$WAIT_RC
	t1=$(date +%s.%N)
	awk -v i="$i" -v sig="$sig" -v rc="$rc" -v a="$t0" -v b="$t1" \
		'BEGIN { printf "b%d %s: exited (%s) after %.2fs\n", i, sig, rc, b - a }' >>"$events"
	sleep "$delay"
	# The new process's launch: it listens a few ms later, before
	# wait_port, which polls every 0.1 s, can tell.
	echo "b$i restarted at $(date +%s.%N)" >>"$events"
	start_backend "$i"
}

RAW=$WORK/raw.jsonl
: >"$RAW"

# one_run runs scenario $2 through path $1 (run number $3).
one_run() {
	local path=$1 scenario=$2 run=$3 tag json events ready
	tag=r$run-$scenario-$path
	json=$WORK/$tag.json
	events=$WORK/$tag.events
	ready=$WORK/$tag.ready
	: >"$events"
	start_proxy "$path" "$tag"
	"${PIN_LOAD[@]}" "$GEN" -target "127.0.0.1:$PROXY_PORT" -c "$CONC" -stream-workers "$STREAM_WORKERS" \
		-duration "${GEN_MAX_SECS}s" -timeout 10s -ready "$ready" >"$json" 2>"$json.err" &
	GEN_PID=$!
	local i
	for ((i = 0; i < 200; i++)); do
		[[ -e $ready ]] && break
		kill -0 "$GEN_PID" 2>/dev/null || break
		sleep 0.05
	done
	[[ -e $ready ]] || die "$tag: the generator did not start (see $json.err)"
	sleep "$LEAD"
	case $scenario in
	rolling)
		for i in 1 2 3; do
			restart_backend "$i" TERM 0.5 "$events"
			sleep "$GAP"
		done
		;;
	kill)
		restart_backend 2 KILL 1 "$events"
		sleep "$GAP"
		;;
	esac
	kill -USR1 "$GEN_PID"
	sleep "$TAIL"
	kill -INT "$GEN_PID"
	local rc
	wait_exit "$GEN_PID" 20
	rc=$WAIT_RC
	GEN_PID=
	[[ $rc == 0 ]] || die "$tag: the generator failed ($rc; see $json.err)"
	kill "$PROXY_PID" 2>/dev/null || true
	wait_exit "$PROXY_PID" 10
	PROXY_PID=
	jq -c --arg path "$path" --arg scenario "$scenario" --argjson run "$run" \
		--arg events "$(paste -sd';' "$events")" \
		'{run: $run, path: $path, scenario: $scenario, events: $events} + .' "$json" >>"$RAW"
	log "$tag: $(jq -r '"\(.count) calls, \(.errors) failed \(.error_codes // {} | tostring); after: \(.after.count) calls, \(.after.errors) failed, split \([.after.backends[] | "\(.name) \(.share | floor)%"] | join(" "))"' "$json")"
}

for ((run = 1; run <= RUNS; run++)); do
	for scenario in $SCENARIOS; do
		for path in $PATHS; do
			one_run "$path" "$scenario" "$run"
		done
	done
done

# ---------------------------------------------------------------- report
ELAPSED=$(($(date +%s) - START_TIME))
{
	echo "# rolling.sh, $(date -u +%Y-%m-%dT%H:%MZ)"
	echo
	echo "streamlb $(cd "$REPO" && git describe --always --dirty 2>/dev/null || echo '?'), $(haproxy -v 2>/dev/null | head -1 | awk '{print "HAProxy " $3}')."
	echo "Load: $CONC unary workers (100 B) and $STREAM_WORKERS server-stream workers (16 x 64 KiB) over one client"
	echo "connection; $PINNING. rolling: SIGTERM, exit, 0.5 s, new process on the same"
	echo "port, ${GAP} s, next backend; kill: SIGKILL b2, 1 s, new process. After window: ${TAIL} s after the"
	echo "last restart. $RUNS runs, ${ELAPSED} s in all."
	echo
	echo "| run | scenario | path | calls | failed | failed by code | unary / stream failed | after: calls, failed | after: split b1 / b2 / b3 |"
	echo "|---|---|---|---:|---:|---|---|---|---|"
	jq -r '
		def share($n): ((.after.backends // []) | map(select(.name == $n)) | if length > 0 then "\(.[0].share | floor)%" else "0%" end);
		"| \(.run) | \(.scenario) | \(.path) | \(.count) | \(.errors) | \(.error_codes // {} | to_entries | map("\(.key) \(.value)") | join(", ") | if . == "" then "-" else . end) | \(.kinds.unary.errors // 0) / \(.kinds.stream.errors // 0) | \(.after.count), \(.after.errors) | \(share("b1")) / \(share("b2")) / \(share("b3")) |"' "$RAW"
	echo
	echo "Totals over the runs:"
	echo
	echo "| scenario | path | calls | failed | failed per run (min-max) |"
	echo "|---|---|---:|---:|---|"
	jq -rs '
		group_by(.scenario + " " + .path)[] |
		"| \(.[0].scenario) | \(.[0].path) | \(map(.count) | add) | \(map(.errors) | add) | \(map(.errors) | min)-\(map(.errors) | max) |"' "$RAW"
	echo
	echo "Kill: time from b2's new process being launched to the first call it answered (its longest gap between answered calls ends there):"
	echo
	jq -r 'select(.scenario == "kill") |
		(.events | capture("b2 restarted at (?<t>[0-9.]+)").t | tonumber) as $up |
		((.backends // []) | map(select(.name == "b2")) | .[0] // {}) as $b |
		if ($b.gap_end // 0) > $up then "- run \(.run), \(.path): \((($b.gap_end - $up) * 1000) | floor) ms (b2 answered no call for \($b.gap_ms | floor) ms)"
		else "- run \(.run), \(.path): none in the \(((.end - $up) * 1000) | floor) ms to the end of the run" end' "$RAW"
	echo
	echo "A kill may fail at most the calls in flight on the killed backend: $CONC + $STREAM_WORKERS in flight in all, about a third of them on it."
	echo "Backend stops (from the events): $(jq -rs 'map(.events) | join(";") | split(";") | map(select(. != "")) | map(capture("exited \\((?<rc>[^)]*)\\) after (?<s>[0-9.]+)s")) | "\(length) stops, exit codes \(map(.rc) | unique | join(",")), longest \(map(.s | tonumber) | max // 0)s"' "$RAW")"
} >"$OUT"
cat "$OUT"
log "report in $OUT; logs and raw JSON in $WORK"
