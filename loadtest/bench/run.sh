#!/usr/bin/env bash
# loadtest/bench/run.sh measures, in one run, the same gRPC workloads through
#
#   direct      the client straight to one backend (the baseline)
#   frame       streamlb proxy --engine frame
#   grpc-proxy  streamlb proxy --engine grpc-proxy (mwitkow/grpc-proxy)
#   haproxy     HAProxy, mode http, h2c on both sides (haproxy.cfg)
#   nginx       nginx grpc_pass over h2c (nginx.conf)
#
# each balancing per call over three `streamlb testserver` backends, with all
# calls of a workload over ONE client connection. The load generator is
# `streamlb loadtest --format json` (ghz inside), which also reports where the
# calls landed. The proxy under test is pinned to CPU 0, the load generator
# and the backends to CPU 1. For each workload the proxy's CPU time is read
# from /proc/PID/stat before and after; its peak RSS is VmHWM.
#
# Paths are interleaved (round r: every workload through direct, frame,
# grpc-proxy, haproxy, nginx; then round r+1), and the report gives medians
# over the rounds, because a shared machine's speed drifts.
#
# Usage: loadtest/bench/run.sh            (as root it installs haproxy and
#                                          nginx with apt-get if missing)
# Knobs (environment): ROUNDS (3), PATHS ("direct frame grpc-proxy haproxy
# nginx"), UNARY_CALLS (20000), RATE (2000), RATE_SECS (5), STREAM_CALLS
# (300), BASE_PORT (27000), OUT (results file; default in the work dir),
# KEEP_WORK (1 keeps the work dir with logs and raw JSON).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROUNDS=${ROUNDS:-3}
PATHS=${PATHS:-"direct frame grpc-proxy haproxy nginx"}
UNARY_CALLS=${UNARY_CALLS:-20000}
RATE=${RATE:-2000}
RATE_SECS=${RATE_SECS:-5}
STREAM_CALLS=${STREAM_CALLS:-300}
BASE_PORT=${BASE_PORT:-27000}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/streamlb-bench.XXXXXX")
OUT=${OUT:-$WORK/results.md}
KEEP_WORK=${KEEP_WORK:-1}
START_TIME=$(date +%s)

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
PIDS=()
cleanup() {
	local status=$?
	trap - EXIT INT TERM
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
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
for tool in jq taskset awk sed; do
	command -v "$tool" >/dev/null || die "$tool is required"
done
command -v go >/dev/null || die "go is required to build streamlb"

NCPU=$(nproc)
if ((NCPU >= 2)); then
	PIN_PROXY=(taskset -c 0)
	PIN_LOAD=(taskset -c 1)
	PINNING="proxy under test on CPU 0; load generator and the 3 backends on CPU 1"
else
	PIN_PROXY=()
	PIN_LOAD=()
	PINNING="not pinned: only $NCPU CPU"
fi
CLK_TCK=$(getconf CLK_TCK)

log "work dir $WORK"
log "building streamlb"
(cd "$REPO" && go build -o "$WORK/streamlb" .) || die "go build failed"
BIN=$WORK/streamlb

NOTES=()
note() { NOTES+=("$*"); log "note: $*"; }

# ensure_pkg installs a Debian package if its command is missing and we are
# root; it fails (returns 1) if the command is still missing.
ensure_pkg() {
	local cmd=$1 pkg=$2
	command -v "$cmd" >/dev/null && return 0
	if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
		log "installing $pkg"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >"$WORK/apt-$pkg.log" 2>&1 ||
			{ apt-get update -q >>"$WORK/apt-$pkg.log" 2>&1 &&
				DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >>"$WORK/apt-$pkg.log" 2>&1; } || true
	fi
	command -v "$cmd" >/dev/null
}

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

P_B1=$((BASE_PORT + 1)) P_B2=$((BASE_PORT + 2)) P_B3=$((BASE_PORT + 3))
declare -A PORT=([direct]=$P_B1 [frame]=$((BASE_PORT + 10)) [grpc-proxy]=$((BASE_PORT + 11))
	[haproxy]=$((BASE_PORT + 12)) [nginx]=$((BASE_PORT + 13)))
declare -A PROC # path -> pid of the proxy process (nginx: the master)

for i in 1 2 3; do
	port_var=P_B$i
	"${PIN_LOAD[@]}" "$BIN" testserver --listen "127.0.0.1:${!port_var}" --name "backend-$i" \
		--log-level warn >"$WORK/backend-$i.log" 2>&1 &
	PIDS+=($!)
done
for port in $P_B1 $P_B2 $P_B3; do
	wait_port "$port" || die "backend on port $port did not start (see $WORK/backend-*.log)"
done
BACKENDS=(--backend "127.0.0.1:$P_B1" --backend "127.0.0.1:$P_B2" --backend "127.0.0.1:$P_B3")

render() { # template -> rendered file
	sed -e "s|@PORT@|$3|g" -e "s|@B1@|$P_B1|g" -e "s|@B2@|$P_B2|g" -e "s|@B3@|$P_B3|g" \
		-e "s|@DIR@|$WORK|g" "$1" >"$2"
}

start_path() {
	local path=$1 port=${PORT[$1]}
	case $path in
	direct)
		return 0
		;;
	frame | grpc-proxy)
		"${PIN_PROXY[@]}" "$BIN" proxy --listen "127.0.0.1:$port" "${BACKENDS[@]}" --engine "$path" \
			--log-level warn >"$WORK/$path.log" 2>&1 &
		;;
	haproxy)
		if ! ensure_pkg haproxy haproxy; then
			note "haproxy skipped: not installed and could not be installed (run as root, or apt-get install haproxy)"
			return 1
		fi
		render "$HERE/haproxy.cfg" "$WORK/haproxy.cfg" "$port"
		haproxy -c -q -f "$WORK/haproxy.cfg" >"$WORK/haproxy-check.log" 2>&1 ||
			{ note "haproxy skipped: config check failed ($(head -c 300 "$WORK/haproxy-check.log"))"; return 1; }
		"${PIN_PROXY[@]}" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
		;;
	nginx)
		if ! ensure_pkg nginx nginx; then
			note "nginx skipped: not installed and could not be installed (run as root, or apt-get install nginx)"
			return 1
		fi
		render "$HERE/nginx.conf" "$WORK/nginx.conf" "$port"
		nginx -t -q -p "$WORK/" -c "$WORK/nginx.conf" >"$WORK/nginx-check.log" 2>&1 ||
			{ note "nginx skipped: config check failed ($(head -c 300 "$WORK/nginx-check.log"))"; return 1; }
		"${PIN_PROXY[@]}" nginx -p "$WORK/" -c "$WORK/nginx.conf" >"$WORK/nginx.log" 2>&1 &
		;;
	esac
	PROC[$path]=$!
	PIDS+=($!)
	wait_port "$port" || { note "$path skipped: it did not start listening (see $WORK/$path.log)"; return 1; }
}

# proc_pids lists the processes whose CPU counts for a path: the proxy and,
# for nginx, its workers.
proc_pids() {
	local pid=${PROC[$1]}
	echo "$pid"
	pgrep -P "$pid" 2>/dev/null || true
}

# cpu_ticks prints the user+system CPU time, in clock ticks, of a path's
# processes (fields 14 and 15 of /proc/PID/stat; the comm field may hold
# spaces, so count from after its closing parenthesis).
cpu_ticks() {
	local total=0 pid t
	for pid in $(proc_pids "$1"); do
		t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
		total=$((total + ${t:-0}))
	done
	echo "$total"
}

# peak_rss_kib prints the summed VmHWM of a path's processes.
peak_rss_kib() {
	local total=0 pid k
	for pid in $(proc_pids "$1"); do
		k=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || k=0
		total=$((total + ${k:-0}))
	done
	echo "$total"
}

ACTIVE=()
for path in $PATHS; do
	if start_path "$path"; then
		ACTIVE+=("$path")
	fi
done
log "paths: ${ACTIVE[*]}"

# ---------------------------------------------------------------- workloads
PAYLOAD=$(head -c 100 /dev/zero | base64 -w0)
UNARY_DATA="{\"response_size\":100,\"payload\":{\"body\":\"$PAYLOAD\"}}"
STREAM_DATA="{\"response_parameters\":[$(printf '{"size":65536},%.0s' $(seq 15)){\"size\":65536}]}"
WORKLOADS=(unary rate stream)
declare -A WDESC=(
	[unary]="unary, 100 B request and response, concurrency 50, $UNARY_CALLS calls at full speed"
	[rate]="unary, 100 B request and response, fixed $RATE calls/s for ${RATE_SECS}s (concurrency 50)"
	[stream]="server stream of 16 x 64 KiB = 1 MiB per call, concurrency 4, $STREAM_CALLS calls"
)
workload_args() {
	case $1 in
	unary) echo "--call grpc.testing.TestService/UnaryCall -c 50 -n $UNARY_CALLS" ;;
	rate) echo "--call grpc.testing.TestService/UnaryCall -c 50 -r $RATE -z ${RATE_SECS}s" ;;
	stream) echo "--call grpc.testing.TestService/StreamingOutputCall -c 4 -n $STREAM_CALLS" ;;
	esac
}
workload_data() {
	case $1 in
	unary | rate) echo "$UNARY_DATA" ;;
	stream) echo "$STREAM_DATA" ;;
	esac
}

RAW=$WORK/raw.tsv
printf 'round\tworkload\tpath\tcalls\terrors\trps\tp50_ms\tp99_ms\tcpu_ticks\tcpu_us_per_call\tsplit\n' >"$RAW"

# run_load runs one workload through one path and appends a line to $RAW.
run_load() {
	local round=$1 w=$2 path=$3 json=$WORK/r$1-$2-$3.json before=0 after=0
	[[ $path != direct ]] && before=$(cpu_ticks "$path")
	# shellcheck disable=SC2046
	if ! timeout 180 "${PIN_LOAD[@]}" "$BIN" loadtest $(workload_args "$w") -d "$(workload_data "$w")" \
		--timeout 30s --format json "127.0.0.1:${PORT[$path]}" >"$json" 2>"$json.err"; then
		note "round $round, $w via $path: loadtest failed: $(head -c 300 "$json.err")"
		return 0
	fi
	[[ $path != direct ]] && after=$(cpu_ticks "$path")
	local calls errors rps p50 p99 split cpu_us=-
	calls=$(jq .count "$json")
	errors=$(jq .errors "$json")
	rps=$(jq .rps "$json")
	p50=$(jq .latency.p50_ms "$json")
	p99=$(jq .latency.p99_ms "$json")
	split=$(jq -r '[.backends[] | "\(.name | sub("backend-"; "b"))=\(.share | round)%"] | join(" ")' "$json")
	if [[ $path != direct ]] && ((calls > 0)); then
		cpu_us=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$calls" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')
	fi
	if ((errors > 0)); then
		note "round $round, $w via $path: $errors of $calls calls failed ($(jq -r '.error_messages // {} | to_entries | map("\(.value)× \(.key)") | join("; ")' "$json" | head -c 400))"
	fi
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$w" "$path" "$calls" "$errors" "$rps" \
		"$p50" "$p99" "$((after - before))" "$cpu_us" "$split" >>"$RAW"
	log "round $round $w via $path: $calls calls, $rps/s, p50 ${p50}ms p99 ${p99}ms, CPU ${cpu_us}µs/call, $split"
}

log "warm-up"
for path in "${ACTIVE[@]}"; do
	timeout 60 "${PIN_LOAD[@]}" "$BIN" loadtest --call grpc.testing.TestService/UnaryCall -c 10 -n 2000 \
		-d "$UNARY_DATA" --format json "127.0.0.1:${PORT[$path]}" >/dev/null 2>&1 ||
		note "warm-up via $path failed"
done

for ((round = 1; round <= ROUNDS; round++)); do
	for w in "${WORKLOADS[@]}"; do
		for path in "${ACTIVE[@]}"; do
			run_load "$round" "$w" "$path"
		done
	done
done

declare -A RSS
for path in "${ACTIVE[@]}"; do
	[[ $path == direct ]] || RSS[$path]=$(peak_rss_kib "$path")
done

# ---------------------------------------------------------------- report
# median prints the median of the numbers on stdin, or - if there are none.
median() {
	sort -g | awk '$1 != "-" {a[++n] = $1} END {
		if (n == 0) { print "-"; exit }
		if (n % 2) print a[(n + 1) / 2]; else print (a[n / 2] + a[n / 2 + 1]) / 2 }'
}
col() { # workload path column-name -> values of that column
	awk -F'\t' -v w="$1" -v p="$2" -v c="$3" 'NR == 1 {for (i = 1; i <= NF; i++) idx[$i] = i; next}
		$2 == w && $3 == p {print $idx[c]}' "$RAW"
}
med() { col "$1" "$2" "$3" | median; }
fmt() { # number, decimals -> formatted, or - for none
	[[ $1 == - || -z $1 ]] && { echo -; return; }
	awk -v v="$1" -v d="$2" 'BEGIN {printf "%.*f", d, v}'
}
ratio() {
	[[ $1 == - || $2 == - || -z $1 || -z $2 ]] && { echo -; return; }
	awk -v a="$1" -v b="$2" 'BEGIN {if (b == 0) print "-"; else printf "%.2f×", a / b}'
}
added() {
	[[ $1 == - || $2 == - || -z $1 || -z $2 ]] && { echo -; return; }
	awk -v a="$1" -v b="$2" 'BEGIN {printf "%+.2f", a - b}'
}

ELAPSED=$(($(date +%s) - START_TIME))
{
	echo "## streamlb benchmark: $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo
	echo "- Machine: $NCPU CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) RAM, $(uname -sr); shared and noisy."
	echo "- Pinning: $PINNING."
	echo "- Versions: $(go version | awk '{print $3}'), streamlb $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet 2>/dev/null || echo '+dirty')$(command -v haproxy >/dev/null && echo ", $(haproxy -v | head -1 | awk '{print "HAProxy", $3}')")$(command -v nginx >/dev/null && echo ", $(nginx -v 2>&1 | sed 's|.*nginx/|nginx |')")."
	echo "- Command: \`ROUNDS=$ROUNDS UNARY_CALLS=$UNARY_CALLS RATE=$RATE RATE_SECS=$RATE_SECS STREAM_CALLS=$STREAM_CALLS loadtest/bench/run.sh\` ($ROUNDS rounds, paths interleaved, medians shown; run took ${ELAPSED}s)."
	echo "- Every workload runs over ONE client connection; the proxies balance per call over 3 backends."
	echo "- CPU is the proxy process's user+system time over the workload (nginx: master and worker), per call; peak RSS is its VmHWM at the end of the run."
	echo
	for w in "${WORKLOADS[@]}"; do
		echo "### $w: ${WDESC[$w]}"
		echo
		if [[ $w == stream ]]; then
			unit="CPU ms/MiB"
		else
			unit="CPU µs/call"
		fi
		echo "| path | calls/s | p50 ms | p99 ms | p50 added | p99 added | $unit | vs HAProxy | vs nginx | peak RSS MiB | split |"
		echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
		d50=$(med "$w" direct p50_ms)
		d99=$(med "$w" direct p99_ms)
		hcpu=$(med "$w" haproxy cpu_us_per_call)
		ncpu=$(med "$w" nginx cpu_us_per_call)
		for path in "${ACTIVE[@]}"; do
			rps=$(med "$w" "$path" rps)
			p50=$(med "$w" "$path" p50_ms)
			p99=$(med "$w" "$path" p99_ms)
			cpu=$(med "$w" "$path" cpu_us_per_call)
			if [[ $w == stream && $cpu != - ]]; then
				shown=$(fmt "$(awk -v c="$cpu" 'BEGIN {print c / 1000}')" 2) # 1 MiB per call
			else
				shown=$(fmt "$cpu" 1)
			fi
			rss=-
			[[ $path != direct ]] && rss=$(fmt "$(awk -v k="${RSS[$path]}" 'BEGIN {print k / 1024}')" 1)
			split=$(col "$w" "$path" split | tail -1)
			if [[ $path == direct ]]; then
				a50=- a99=-
			else
				a50=$(added "$p50" "$d50") a99=$(added "$p99" "$d99")
			fi
			echo "| $path | $(fmt "$rps" 0) | $(fmt "$p50" 2) | $(fmt "$p99" 2) | $a50 | $a99 | $shown | $(ratio "$cpu" "$hcpu") | $(ratio "$cpu" "$ncpu") | $rss | ${split:--} |"
		done
		echo
	done
	echo "Per round, CPU µs per call (unary, rate) and per 1 MiB stream call (stream), to show the drift:"
	echo
	echo "| workload | path | $(for ((r = 1; r <= ROUNDS; r++)); do printf 'round %d | ' "$r"; done)"
	echo "|---|---|$(for ((r = 1; r <= ROUNDS; r++)); do printf -- '---:|'; done)"
	for w in "${WORKLOADS[@]}"; do
		for path in "${ACTIVE[@]}"; do
			[[ $path == direct ]] && continue
			printf '| %s | %s | ' "$w" "$path"
			for ((r = 1; r <= ROUNDS; r++)); do
				v=$(awk -F'\t' -v r="$r" -v w="$w" -v p="$path" '$1 == r && $2 == w && $3 == p {print $10}' "$RAW")
				printf '%s | ' "${v:--}"
			done
			echo
		done
	done
	if ((${#NOTES[@]} > 0)); then
		echo
		echo "Notes:"
		for n in "${NOTES[@]}"; do echo "- $n"; done
	fi
} >"$OUT"

echo
cat "$OUT"
echo
log "results: $OUT (raw per-round data: $RAW)"
