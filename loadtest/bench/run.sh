#!/usr/bin/env bash
# loadtest/bench/run.sh measures, in one run, the same gRPC workloads through
#
#   direct           the client straight to one backend (the baseline)
#   client-rr        a grpc-go client doing its own round_robin over the
#                    three backends, one connection each (issue 12's calls/s
#                    baseline: no proxy at all)
#   frame            streamlb proxy --engine frame as it runs in production:
#                    the production build (CGO_ENABLED=0 go build -tags
#                    proxyonly,grpcnotrace,urfave_cli_no_docs, as the
#                    Dockerfile builds it), metrics on,
#                    admin listener, /metrics scraped every second
#   frame-full       the same with the full binary (go build ., every
#                    command linked in), to show what the production build
#                    saves; its own admin listener, scraped the same way
#   frame-nometrics  the same with --metrics=false and no admin listener
#   frame-unpinned   frame-nometrics NOT pinned: allowed on every CPU
#                    (taskset -c 0-N, so an inherited affinity does not
#                    pin it) and GOMAXPROCS=2, so it may use both CPUs,
#                    sharing CPU 1 with the load generator and the
#                    backends; beside the pinned one, it shows what a
#                    second CPU does to calls/s and CPU per call (issue
#                    12's multi-core item; on a 2-CPU machine the second
#                    CPU is the load's, so this is no clean scaling test)
#   grpc-proxy       streamlb proxy --engine grpc-proxy (mwitkow/grpc-proxy)
#                    (every streamlb proxy path but frame-full runs the
#                    production build; the backends run the full binary)
#   haproxy          HAProxy, mode http, h2c on both sides (haproxy.cfg)
#   haproxy-unpinned the same with nbthread 2 and not pinned, like for like
#                    with frame-unpinned
#   nginx            nginx grpc_pass over h2c (nginx.conf)
#   frame-base       frame-nometrics run from the binary BASE_BIN (a build of
#                    another commit), for a before and after in one run; only
#                    when named in PATHS. BASE_METRICS=1 runs it as frame
#                    instead (metrics on, its own admin listener scraped
#                    every second), to compare like with like against frame
#   frame-tls        frame terminating TLS (--metrics=false), h2c to backends
#   haproxy-tls      HAProxy terminating TLS, h2c to backends
#   nginx-tls        nginx terminating TLS, h2c to backends
#
# each balancing per call over three `streamlb testserver` backends, with all
# calls of a workload over ONE client connection. The TLS certificates are
# made by this script with openssl (a throw-away CA, ECDSA P-256).
#
# The load generator is loadtest/bench/gen, a plain grpc-go client (the
# generated stub, no JSON, no frame tap), so the generator is not what sets
# the pace; each call's backend comes from the backend itself (server_id of
# the response, x-backend of a stream). The proxy under test is pinned to
# CPU 0, the load generator and the backends to CPU 1: on a 2-CPU machine
# calls/s is bounded by what one CPU does for client plus backends, the same
# budget for every path, and the proxy's cost is its CPU per call. For each
# workload the proxy's CPU time is read from /proc/PID/stat before and
# after; its peak RSS is VmHWM, and its peak RssAnon (anonymous memory: heap,
# stacks, runtime; the rest of RSS is the binary's and libraries' pages) is
# sampled every 0.1 s during the workloads; its backend connections are
# counted with ss after the workload.
#
# Paths are interleaved (round r: every workload through every path; then
# round r+1), and the report gives medians over the rounds, because a
# shared machine's speed drifts. Then the idle-connection step opens
# IDLE_CONNS idle HTTP/2 connections (loadtest/bench/idleconns) to a fresh
# frame proxy, HAProxy, nginx and a plain grpc-go server (testserver) each,
# and reports the RSS each holds per idle connection; then again with
# connections that each made one call before going idle (IDLE_CALL).
# Last, the same-time step runs the production build beside HAProxy
# (unary, rate) and nginx (stream) at the same time with simulab.sh, and
# reports the ratio of their CPU per call: the steadier reading of the
# issue's ratios, since both see the same moments of the machine.
#
# Usage: loadtest/bench/run.sh            (as root it installs haproxy and
#                                          nginx with apt-get if missing)
#        QUICK=1 loadtest/bench/run.sh    (smoke run: 1 round, short
#                                          workloads, 1,000 idle connections)
# Knobs (environment): ROUNDS (3), PATHS ("direct client-rr frame
# frame-full frame-nometrics grpc-proxy haproxy nginx frame-tls haproxy-tls nginx-tls";
# frame-unpinned, haproxy-unpinned and frame-base run only when named),
# WORKLOADS ("unary rate stream"), UNARY_CALLS (20000), RATE (2000),
# RATE_SECS (5), STREAM_CALLS (300), MAX_SECS (3: bound on the unary and
# stream workloads, whichever of it and the call count comes first), IDLE_CONNS (5000; 0 skips the step),
# IDLE_PATHS ("frame haproxy nginx grpc-go"; frame-tls, haproxy-tls and
# nginx-tls are measured over TLS), IDLE_SETTLE (8s: idleconns'
# wait after the last handshake; the frame proxy parks idle readers 1-3 s
# after they go quiet), IDLE_CALL (/grpc.testing.TestService/EmptyCall:
# the idle step runs again with connections that each made this call
# first; empty skips that run), SIMUL_ROUNDS (4; 0 skips the same-time
# step) and SIMUL_SECS (4: each round's seconds), BASE_PORT (27000; the
# script uses BASE_PORT+1 to +60), BASE_BIN and
# BASE_METRICS (0; see frame-base), TCP_CC (a TCP congestion control,
# e.g. cubic, set for the run; the host's by default), OUT (results
# file; default in the work dir), KEEP_WORK (1 keeps the work dir with logs
# and raw JSON).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=loadtest/bench/lib.sh
source "$HERE/lib.sh"
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
	ROUNDS=${ROUNDS:-1} UNARY_CALLS=${UNARY_CALLS:-5000} RATE_SECS=${RATE_SECS:-2}
	STREAM_CALLS=${STREAM_CALLS:-60} IDLE_CONNS=${IDLE_CONNS:-1000}
	SIMUL_ROUNDS=${SIMUL_ROUNDS:-1} SIMUL_SECS=${SIMUL_SECS:-2}
fi
ROUNDS=${ROUNDS:-3}
PATHS=${PATHS:-"direct client-rr frame frame-full frame-nometrics grpc-proxy haproxy nginx frame-tls haproxy-tls nginx-tls"}
WORKLOADS=(${WORKLOADS:-unary rate stream})
UNARY_CALLS=${UNARY_CALLS:-20000}
RATE=${RATE:-2000}
RATE_SECS=${RATE_SECS:-5}
STREAM_CALLS=${STREAM_CALLS:-300}
# A slow path (nginx: about 1k unary calls/s with TLS, 25 streams/s) stops
# at this bound rather than make the run longer than 10 minutes; its
# figures are per call, so fewer calls still compare.
MAX_SECS=${MAX_SECS:-3}
IDLE_CONNS=${IDLE_CONNS:-5000}
IDLE_SETTLE=${IDLE_SETTLE:-8s}
IDLE_PATHS=${IDLE_PATHS:-"frame haproxy nginx grpc-go"}
IDLE_CALL=${IDLE_CALL-/grpc.testing.TestService/EmptyCall}
SIMUL_ROUNDS=${SIMUL_ROUNDS:-4}
SIMUL_SECS=${SIMUL_SECS:-4}
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
	if [[ ${CC_SET:-0} == 1 ]]; then
		sysctl -qw net.ipv4.tcp_congestion_control="$CC_ORIG" || true
	fi
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- setup
for tool in jq taskset awk sed ss; do
	command -v "$tool" >/dev/null || die "$tool is required"
done
command -v go >/dev/null || die "go is required to build streamlb"

# The TCP congestion control the connections use: the proxies' CPU per
# MiB on loopback depends on it, nginx's most (1.3-2 times as much with
# cubic, Linux's default, as with bbr, whose pacing likely gathers its
# 4 KiB writes into larger packets), HAProxy's by about a quarter, streamlb's
# within the noise (BENCHMARKS.md, session 23). The report names it;
# TCP_CC sets it for the run (root), and it is set back at the end.
CC_ORIG=$(sysctl -n net.ipv4.tcp_congestion_control 2>/dev/null || echo unknown)
CC=$CC_ORIG
if [[ -n ${TCP_CC:-} && $TCP_CC != "$CC_ORIG" ]]; then
	sysctl -qw net.ipv4.tcp_congestion_control="$TCP_CC" ||
		die "TCP_CC=$TCP_CC: cannot set net.ipv4.tcp_congestion_control (needs root; available: $(sysctl -n net.ipv4.tcp_available_congestion_control 2>/dev/null))"
	CC_SET=1 CC=$TCP_CC
fi

NCPU=$(nproc)
if ((NCPU >= 2)); then
	PIN_PROXY=(taskset -c 0)
	PIN_LOAD=(taskset -c 1)
	PINNING="proxy under test on CPU 0; load generator and the 3 backends on CPU 1"
	# The *-unpinned paths: every CPU, whatever affinity this script got.
	UNPIN=(taskset -c "0-$((NCPU - 1))")
else
	PIN_PROXY=()
	UNPIN=()
	PIN_LOAD=()
	PINNING="not pinned: only $NCPU CPU"
fi

log "work dir $WORK"
log "building streamlb (production and full), the load generator and idleconns"
# PROD_BIN is the proxy as it is deployed: the Dockerfile's build (static,
# -tags proxyonly,...: no testserver, demo or loadtest command). FULL_BIN has
# every command: it runs the backends and the frame-full path.
(cd "$REPO" && CGO_ENABLED=0 go build -tags proxyonly,grpcnotrace,urfave_cli_no_docs -trimpath -o "$WORK/streamlb-prod" . &&
	go build -o "$WORK/streamlb" . && go build -o "$WORK/gen" ./loadtest/bench/gen &&
	go build -o "$WORK/idleconns" ./loadtest/bench/idleconns) || die "go build failed"
BIN=$WORK/streamlb-prod
FULL_BIN=$WORK/streamlb
GEN=$WORK/gen

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

# pids_of lists a process and its children (nginx: the master and workers).
pids_of() {
	echo "$1"
	pgrep -P "$1" 2>/dev/null || true
}

# owned_port succeeds if process $2 (or its child) listens on 127.0.0.1:$1.
owned_port() {
	local pids
	pids=$(pids_of "$2" | paste -sd'|')
	ss -Htlnp "sport = :$1" 2>/dev/null | grep -qE "pid=($pids),"
}

P_B1=$((BASE_PORT + 1)) P_B2=$((BASE_PORT + 2)) P_B3=$((BASE_PORT + 3))
declare -A PORT=([direct]=$P_B1 [client-rr]=- [frame]=$((BASE_PORT + 10)) [grpc-proxy]=$((BASE_PORT + 11))
	[haproxy]=$((BASE_PORT + 12)) [nginx]=$((BASE_PORT + 13)) [frame-nometrics]=$((BASE_PORT + 14))
	[frame-tls]=$((BASE_PORT + 15)) [haproxy-tls]=$((BASE_PORT + 16)) [nginx-tls]=$((BASE_PORT + 17))
	[frame-full]=$((BASE_PORT + 18)) [frame-base]=$((BASE_PORT + 19))
	[frame-unpinned]=$((BASE_PORT + 22)) [haproxy-unpinned]=$((BASE_PORT + 23)))
ADMIN_PORT=$((BASE_PORT + 20))
declare -A ADMIN=([frame]=$ADMIN_PORT [frame-full]=$((BASE_PORT + 21)))
if [[ ${BASE_METRICS:-0} == 1 ]]; then
	ADMIN[frame-base]=$((BASE_PORT + 22))
fi
declare -A PROC # path -> pid of the proxy process (nginx: the master)

BACKEND_PIDS=()
for i in 1 2 3; do
	port_var=P_B$i
	"${PIN_LOAD[@]}" "$FULL_BIN" testserver --listen "127.0.0.1:${!port_var}" --name "backend-$i" \
		--log-level warn >"$WORK/backend-$i.log" 2>&1 &
	PIDS+=($!)
	BACKEND_PIDS+=($!)
done
for i in 0 1 2; do
	port_var=P_B$((i + 1))
	port=${!port_var}
	wait_port "$port" || die "backend on port $port did not start (see $WORK/backend-*.log)"
	# Another process on the port would answer instead, unpinned and
	# uncounted: make sure the listener is ours.
	owned_port "$port" "${BACKEND_PIDS[$i]}" ||
		die "port $port is held by another process (BASE_PORT=$BASE_PORT; see $WORK/backend-$((i + 1)).log)"
done
BACKENDS=(--backend "127.0.0.1:$P_B1" --backend "127.0.0.1:$P_B2" --backend "127.0.0.1:$P_B3")

# TLS material for the *-tls paths: a throw-away CA and a server certificate
# for localhost and 127.0.0.1, ECDSA P-256.
TLS_DIR=$WORK/tls
make_certs() {
	[[ -f $TLS_DIR/server.pem ]] && return 0
	command -v openssl >/dev/null || return 1
	mkdir -p "$TLS_DIR"
	(
		cd "$TLS_DIR" &&
			openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key \
				-out ca.crt -days 2 -subj /CN=streamlb-bench-ca &&
			openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key \
				-out server.csr -subj /CN=localhost &&
			printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >san.ext &&
			openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt \
				-days 2 -extfile san.ext &&
			cat server.crt server.key >server.pem
	) >"$WORK/openssl.log" 2>&1
}

render() { # template rendered-file port name bind-or-listen tls-lines [threads]
	sed -e "s|@PORT@|$3|g" -e "s|@B1@|$P_B1|g" -e "s|@B2@|$P_B2|g" -e "s|@B3@|$P_B3|g" \
		-e "s|@DIR@|$WORK|g" -e "s|@NAME@|$4|g" -e "s|@BIND@|$5|g" -e "s|@LISTEN@|$5|g" \
		-e "s|@TLS@|$6|g" -e "s|@THREADS@|${7:-1}|g" "$1" >"$2"
}

SCRAPERS=()
# start_proc starts the process of one path (or, for the idle step, of one
# idle target) listening on port; it sets STARTED to its pid.
start_proc() {
	local path=$1 port=$2 name=$3
	local base=${path%-tls} tls=0
	[[ $path == *-tls ]] && tls=1
	if ((tls)) && ! make_certs; then
		note "$path skipped: could not make certificates with openssl (see $WORK/openssl.log)"
		return 1
	fi
	local tlsflags=()
	((tls)) && tlsflags=(--tls-cert "$TLS_DIR/server.crt" --tls-key "$TLS_DIR/server.key")
	case $base in
	frame | frame-full)
		# frame: as in production, metrics on and an admin listener (the
		# idle step: the default flags); frame-tls: --metrics=false, beside
		# frame-nometrics, so the two differ by TLS alone. frame-full: frame
		# with the full binary.
		local extra=() bin=$BIN
		[[ $base == frame-full ]] && bin=$FULL_BIN
		if ((tls)); then
			extra=(--metrics=false)
		elif [[ -n ${ADMIN[$name]:-} ]]; then
			extra=(--admin-listen "127.0.0.1:${ADMIN[$name]}")
		fi
		"${PIN_PROXY[@]}" "$bin" proxy --listen "127.0.0.1:$port" "${BACKENDS[@]}" --engine frame \
			"${extra[@]}" "${tlsflags[@]}" --log-level warn >"$WORK/$name.log" 2>&1 &
		;;
	frame-base)
		# frame-nometrics from another build (BASE_BIN), for a before and
		# after in the same run; with BASE_METRICS=1, frame's settings.
		[[ -x ${BASE_BIN:-} ]] || { note "$path skipped: set BASE_BIN to a streamlb binary"; return 1; }
		local bextra=(--metrics=false)
		[[ -n ${ADMIN[$name]:-} ]] && bextra=(--admin-listen "127.0.0.1:${ADMIN[$name]}")
		"${PIN_PROXY[@]}" "$BASE_BIN" proxy --listen "127.0.0.1:$port" "${BACKENDS[@]}" --engine frame \
			"${bextra[@]}" --log-level warn >"$WORK/$name.log" 2>&1 &
		;;
	frame-nometrics)
		"${PIN_PROXY[@]}" "$BIN" proxy --listen "127.0.0.1:$port" "${BACKENDS[@]}" --engine frame \
			--metrics=false --log-level warn >"$WORK/$name.log" 2>&1 &
		;;
	frame-unpinned)
		# frame-nometrics on every CPU with GOMAXPROCS=2 (the pinned paths
		# get GOMAXPROCS 1: the Go runtime sizes it to the affinity).
		"${UNPIN[@]}" env GOMAXPROCS=2 "$BIN" proxy --listen "127.0.0.1:$port" "${BACKENDS[@]}" \
			--engine frame --metrics=false --log-level warn >"$WORK/$name.log" 2>&1 &
		;;
	grpc-proxy)
		"${PIN_PROXY[@]}" "$BIN" proxy --listen "127.0.0.1:$port" "${BACKENDS[@]}" --engine grpc-proxy \
			--log-level warn >"$WORK/$name.log" 2>&1 &
		;;
	grpc-go)
		"${PIN_PROXY[@]}" "$FULL_BIN" testserver --listen "127.0.0.1:$port" --name idle \
			--log-level warn >"$WORK/$name.log" 2>&1 &
		;;
	haproxy | haproxy-unpinned)
		if ! ensure_pkg haproxy haproxy; then
			note "$path skipped: not installed and could not be installed (run as root, or apt-get install haproxy)"
			return 1
		fi
		local bind="proto h2"
		((tls)) && bind="ssl crt $TLS_DIR/server.pem alpn h2"
		local threads=1 pin=("${PIN_PROXY[@]}")
		[[ $base == haproxy-unpinned ]] && threads=2 pin=("${UNPIN[@]}")
		render "$HERE/haproxy.cfg" "$WORK/$name.cfg" "$port" "$name" "$bind" "" "$threads"
		haproxy -c -q -f "$WORK/$name.cfg" >"$WORK/$name-check.log" 2>&1 ||
			{ note "$path skipped: config check failed ($(head -c 300 "$WORK/$name-check.log"))"; return 1; }
		# As root, HAProxy raises its own open-file limit to fit maxconn.
		"${pin[@]}" haproxy -db -f "$WORK/$name.cfg" >"$WORK/$name.log" 2>&1 &
		;;
	nginx)
		if ! ensure_pkg nginx nginx; then
			note "$path skipped: not installed and could not be installed (run as root, or apt-get install nginx)"
			return 1
		fi
		local listen=http2 tlslines=""
		if ((tls)); then
			listen="ssl http2"
			tlslines="ssl_certificate $TLS_DIR/server.crt; ssl_certificate_key $TLS_DIR/server.key; ssl_protocols TLSv1.2 TLSv1.3;"
		fi
		render "$HERE/nginx.conf" "$WORK/$name.conf" "$port" "$name" "$listen" "$tlslines"
		nginx -t -q -p "$WORK/" -c "$WORK/$name.conf" >"$WORK/$name-check.log" 2>&1 ||
			{ note "$path skipped: config check failed ($(head -c 300 "$WORK/$name-check.log"))"; return 1; }
		"${PIN_PROXY[@]}" nginx -p "$WORK/" -c "$WORK/$name.conf" >"$WORK/$name.log" 2>&1 &
		;;
	*)
		die "unknown path $path"
		;;
	esac
	STARTED=$!
	PIDS+=($!)
	wait_port "$port" || { note "$path skipped: it did not start listening (see $WORK/$name.log)"; return 1; }
	owned_port "$port" "$STARTED" || { note "$path skipped: port $port is held by another process"; return 1; }
}

start_path() {
	local path=$1
	case $path in
	direct | client-rr) return 0 ;;
	esac
	start_proc "$path" "${PORT[$path]}" "$path" || return 1
	PROC[$path]=$STARTED
	if [[ -n ${ADMIN[$path]:-} ]]; then
		# Scrape /metrics once a second, as Prometheus would, for the whole
		# run (only the path's own workload windows count towards its CPU).
		# On CPU 0, as the RssAnon sampler: see scraper. Cleanup kills it.
		"${PIN_PROXY[@]}" bash -c "$(declare -f scraper); scraper \"\$@\"" _ "$WORK/scrape-$path" "${ADMIN[$path]}" &
		SCRAPERS+=($!)
		PIDS+=($!)
	fi
}

proc_pids() { pids_of "${PROC[$1]}"; }

# cpu_ns prints the CPU time, in ns, of a path's processes, or of the
# three backends for "backends": the sum over their threads of the first
# field of /proc/PID/task/TID/schedstat, the scheduler's own count. (The
# user and system times of /proc/PID/stat come in 10 ms ticks: 20-40 ticks
# for the proxy over a unary workload, so a tick was 2-5% of a figure.)
cpu_ns() {
	local pids
	if [[ $1 == backends ]]; then
		pids=${BACKEND_PIDS[*]}
	else
		pids=$(proc_pids "$1")
	fi
	for pid in $pids; do
		cat /proc/"$pid"/task/*/schedstat 2>/dev/null || true
	done | awk '{t += $1} END {printf "%.0f\n", t}' # not %d: mawk's stops at 2^31-1
}

# backend_runs prints how many times the three backends' threads were
# put on a CPU (the third field of /proc/PID/task/TID/schedstat), which is
# their context switches in. Per call, it is what explains calls/s against
# client-rr: the backends share CPU 1 with the load generator, and a proxy
# on CPU 0 wakes them with fewer calls each time than a client on their
# own CPU does (BENCHMARKS.md, session 22).
backend_runs() {
	local pid
	for pid in "${BACKEND_PIDS[@]}"; do
		cat /proc/"$pid"/task/*/schedstat 2>/dev/null || true
	done | awk '{t += $3} END {printf "%.0f\n", t}'
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


# anon_sampler FILE PID...: every 0.1 s while FILE.on exists (at most
# 200 s), sums the processes' anonymous RSS and writes the largest sum
# seen, in KiB, to FILE. It must cost the machine next to nothing: it runs
# only during a proxy path's workloads, so what it takes from the CPUs is
# taken from those paths and not from direct and client-rr. It reads
# /proc/PID/statm (resident minus shared pages is RssAnon: file-backed and
# shmem pages are the shared ones), which the kernel makes far more cheaply
# than /proc/PID/status, with bash builtins, and waits with `read -t` on a
# FIFO nobody writes instead of forking sleep(1). The version before,
# /proc/PID/status read line by line and sleep(1), took about 5% of CPU 1,
# the generator's and the backends' CPU, from every proxy path (0.5% now,
# and on CPU 0; perf stat -e task-clock of the sampler alone).
anon_sampler() {
	local file=$1 max=0 i total pid res shr fd kib
	kib=$(($(getconf PAGESIZE) / 1024))
	shift
	mkfifo "$file.tick" && exec {fd}<>"$file.tick" && rm -f "$file.tick" || return 0
	for ((i = 0; i < 2000; i++)); do
		[[ -e $file.on ]] || break
		total=0
		for pid in "$@"; do
			read -r _ res shr _ <"/proc/$pid/statm" 2>/dev/null || continue
			total=$((total + (res - shr) * kib))
		done
		((total > max)) && { max=$total; echo "$max" >"$file"; }
		read -rt 0.1 -u "$fd" || true
	done
	exec {fd}<&-
}

# backend_conns counts the established TCP connections a path's processes
# hold to the three backends.
backend_conns() {
	local path=$1
	case $path in
	direct) echo 1; return ;;
	client-rr) echo 3; return ;; # one subchannel per backend, by construction
	esac
	local pids
	pids=$(proc_pids "$path" | paste -sd'|')
	ss -Htnp state established "( dport = :$P_B1 or dport = :$P_B2 or dport = :$P_B3 )" 2>/dev/null |
		grep -cE "pid=($pids)," || true
}

ACTIVE=()
for path in $PATHS; do
	[[ -n ${PORT[$path]:-} ]] || die "unknown path $path (known: ${!PORT[*]})"
	if start_path "$path"; then
		ACTIVE+=("$path")
	fi
done
log "paths: ${ACTIVE[*]}"

# ---------------------------------------------------------------- workloads
declare -A WDESC=(
	[unary]="unary, 100 B request and response, concurrency 50, $UNARY_CALLS calls (or ${MAX_SECS}s) at full speed"
	[rate]="unary, 100 B request and response, fixed $RATE calls/s for ${RATE_SECS}s (concurrency 50)"
	[stream]="server stream of 16 x 64 KiB = 1 MiB per call, concurrency 4, $STREAM_CALLS calls (or ${MAX_SECS}s)"
)
workload_args() {
	case $1 in
	unary) echo "-c 50 -n $UNARY_CALLS -duration ${MAX_SECS}s" ;;
	rate) echo "-c 50 -rate $RATE -duration ${RATE_SECS}s" ;;
	stream) echo "-stream -c 4 -n $STREAM_CALLS -duration ${MAX_SECS}s" ;;
	esac
}
target_args() {
	case $1 in
	client-rr) echo "-targets 127.0.0.1:$P_B1,127.0.0.1:$P_B2,127.0.0.1:$P_B3" ;;
	*-tls) echo "-target 127.0.0.1:${PORT[$1]} -cacert $TLS_DIR/ca.crt -servername localhost" ;;
	*) echo "-target 127.0.0.1:${PORT[$1]}" ;;
	esac
}
has_proc() { [[ $1 != direct && $1 != client-rr ]]; }

RAW=$WORK/raw.tsv
printf 'round\tworkload\tpath\tcalls\terrors\trps\tp50_ms\tp99_ms\tcpu_ns\tcpu_us_per_call\tsplit\tbackend_conns\tbackends_us_per_call\tanon_peak_kib\tgen_us_per_call\tbackends_runs_per_call\n' >"$RAW"

# run_load runs one workload through one path and appends a line to $RAW.
run_load() {
	local round=$1 w=$2 path=$3 json=$WORK/r$1-$2-$3.json before=0 after=0 bbefore bafter rbefore rafter
	local anon=$WORK/anon-r$1-$2-$3 sampler= anon_kib=-
	if has_proc "$path"; then
		before=$(cpu_ns "$path")
		touch "$anon.on"
		# shellcheck disable=SC2046
		# On the proxy's CPU, which has room (the load generator's CPU is
		# the bottleneck), so that direct and client-rr, which have no
		# sampler, and the proxy paths see the same CPU 1.
		"${PIN_PROXY[@]}" bash -c "$(declare -f anon_sampler); anon_sampler \"\$@\"" _ "$anon" $(proc_pids "$path") &
		sampler=$!
	fi
	bbefore=$(cpu_ns backends)
	rbefore=$(backend_runs)
	# shellcheck disable=SC2046
	if ! timeout 180 "${PIN_LOAD[@]}" "$GEN" $(workload_args "$w") $(target_args "$path") \
		>"$json" 2>"$json.err"; then
		note "round $round, $w via $path: load generator failed: $(head -c 300 "$json.err")"
		rm -f "$anon.on"
		[[ -n $sampler ]] && wait "$sampler" 2>/dev/null
		return 0
	fi
	has_proc "$path" && after=$(cpu_ns "$path")
	bafter=$(cpu_ns backends)
	rafter=$(backend_runs)
	if [[ -n $sampler ]]; then
		rm -f "$anon.on"
		wait "$sampler" 2>/dev/null || true
		[[ -s $anon ]] && anon_kib=$(<"$anon")
	fi
	local calls errors rps p50 p99 split cpu_us=- conns bcpu_us=- gcpu_us=- bruns=-
	calls=$(jq .count "$json")
	errors=$(jq .errors "$json")
	rps=$(jq .rps "$json")
	p50=$(jq .latency.p50_ms "$json")
	p99=$(jq .latency.p99_ms "$json")
	split=$(jq -r '[.backends // [] | .[] | "\(.name | sub("backend-"; "b"))=\(.share | round)%"] | join(" ")' "$json")
	conns=$(backend_conns "$path")
	if has_proc "$path" && ((calls > 0)); then
		cpu_us=$(awk -v t=$((after - before)) -v n="$calls" 'BEGIN {printf "%.2f", t / 1e3 / n}')
	fi
	((calls > 0)) && bcpu_us=$(awk -v t=$((bafter - bbefore)) -v n="$calls" 'BEGIN {printf "%.2f", t / 1e3 / n}')
	((calls > 0)) && bruns=$(awk -v t=$((rafter - rbefore)) -v n="$calls" 'BEGIN {printf "%.3f", t / n}')
	# The generator's own CPU over its calls (gen's cpu_ms): with the
	# backends', what CPU 1 spends per call, which bounds calls/s.
	((calls > 0)) && gcpu_us=$(jq -r --argjson n "$calls" 'if .cpu_ms then .cpu_ms * 1000 / $n * 100 | round / 100 else "-" end' "$json")
	if ((errors > 0)); then
		note "round $round, $w via $path: $errors of $calls calls failed ($(jq -r '.error_messages // {} | to_entries | map("\(.value)× \(.key)") | join("; ")' "$json" | head -c 400))"
	fi
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$w" "$path" "$calls" "$errors" "$rps" \
		"$p50" "$p99" "$((after - before))" "$cpu_us" "$split" "$conns" "$bcpu_us" "$anon_kib" "$gcpu_us" "$bruns" >>"$RAW"
	log "round $round $w via $path: $calls calls ($errors failed), $(fmt "$rps" 0)/s, p50 ${p50}ms p99 ${p99}ms, CPU ${cpu_us}µs/call (backends ${bcpu_us} in ${bruns} runs, generator ${gcpu_us}), $split, $conns backend conns"
}

fmt() { # number, decimals -> formatted, or - for none
	[[ $1 == - || -z $1 ]] && { echo -; return; }
	awk -v v="$1" -v d="$2" 'BEGIN {printf "%.*f", d, v}'
}

log "warm-up"
for path in "${ACTIVE[@]}"; do
	# shellcheck disable=SC2046
	timeout 60 "${PIN_LOAD[@]}" "$GEN" -c 10 -n 2000 $(target_args "$path") >/dev/null 2>&1 ||
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
	has_proc "$path" && RSS[$path]=$(peak_rss_kib "$path")
done
for pid in "${SCRAPERS[@]}"; do kill "$pid" 2>/dev/null || true; done

# ---------------------------------------------------------------- idle connections
# Each idle target is a fresh process on CPU 0, so the RSS it gains is the
# idle connections' and nothing else's; it is stopped after its reading.
# Twice per target: connections that only made the handshake, then (with
# IDLE_CALL) connections that each made one call first, as a real
# client's idle connection has: its HPACK tables and what its call left.
IDLE_RAW=$WORK/idle.tsv
printf 'path\tcall\tconns\topen\trss_before_kib\trss_after_kib\tkib_per_conn\n' >"$IDLE_RAW"
if ((IDLE_CONNS > 0)); then
	ip=0
	modes=(-)
	[[ -n $IDLE_CALL ]] && modes+=("$IDLE_CALL")
	for path in $IDLE_PATHS; do
		for mode in "${modes[@]}"; do
			port=$((BASE_PORT + 30 + ip))
			ip=$((ip + 1))
			tag=$path
			callflag=()
			if [[ $mode != - ]]; then
				tag=$path-call callflag=(-call "$mode")
			fi
			# The *-tls paths terminate TLS: the connections speak it.
			[[ $path == *-tls ]] && callflag+=(-cacert "$TLS_DIR/ca.crt" -servername localhost)
			STARTED=
			if ! start_proc "$path" "$port" "idle-$tag"; then
				note "idle connections via $path skipped"
				continue
			fi
			sleep 1 # let the fresh process settle before the first RSS reading
			pids=$(pids_of "$STARTED" | paste -sd,)
			if timeout 120 "${PIN_LOAD[@]}" "$WORK/idleconns" -target "127.0.0.1:$port" -pid "$pids" \
				-n "$IDLE_CONNS" -settle "$IDLE_SETTLE" "${callflag[@]}" >"$WORK/idle-$tag.json" 2>"$WORK/idle-$tag.err"; then
				:
			else
				note "idle connections via $path${callflag[*]:+ (${callflag[*]})}: $(head -c 300 "$WORK/idle-$tag.err")"
			fi
			if [[ -s $WORK/idle-$tag.json ]]; then
				jq -r --arg p "$path" --arg c "$mode" '[$p, $c, .conns, .open_at_end, .rss_before_kib, .rss_after_kib, (.kib_per_conn * 10 | round / 10)] | @tsv' \
					"$WORK/idle-$tag.json" >>"$IDLE_RAW"
				log "idle connections via $path${callflag[*]:+ after one call}: $(jq -r '"\(.open_at_end) of \(.conns) open, \(.kib_per_conn * 10 | round / 10) KiB RSS each"' "$WORK/idle-$tag.json")"
			fi
			for pid in $(pids_of "$STARTED"); do kill "$pid" 2>/dev/null || true; done
			wait "$STARTED" 2>/dev/null || true
		done
	done
fi

# ---------------------------------------------------------------- same time
# The rounds above run one proxy at a time, and a shared machine's speed
# moves between them: rounds of one path differ by 30% and more, so one
# run meets a goal the next misses. Here simulab.sh runs the production
# build and HAProxy (unary, rate) or nginx (stream) AT THE SAME TIME, both
# pinned to CPU 0, each with its own generator on CPU 1, so both see the
# same moments of the machine; the build has frame's settings (metrics
# on, its admin listener scraped once a second). Once with the build
# started first, once with the other, SIMUL_ROUNDS rounds each.
SIMUL_RAW=$WORK/simul.tsv
printf 'workload\tother\tfirst\tmedian\tmin\tmax\trounds\n' >"$SIMUL_RAW"
if ((SIMUL_ROUNDS > 0)) && [[ " ${ACTIVE[*]} " == *" frame "* ]] && ((NCPU >= 2)); then
	mkdir -p "$WORK/simul"
	ln -sf "$FULL_BIN" "$WORK/simul/streamlb"
	ln -sf "$GEN" "$WORK/simul/gen"
	frameflags="--metrics=true --admin-listen 127.0.0.1:$((BASE_PORT + 49))"
	for w in "${WORKLOADS[@]}"; do
		case $w in
		unary) g="-c 50" other=haproxy warm=3000 ;;
		rate) g="-c 50 -rate $RATE" other=haproxy warm=3000 ;;
		stream) g="-stream -c 4" other=nginx warm=100 ;;
		esac
		[[ " ${ACTIVE[*]} " == *" $other "* ]] || continue
		for first in frame "$other"; do
			if [[ $first == frame ]]; then
				a=$BIN b=$other af=$frameflags bf=--metrics=false
			else
				a=$other b=$BIN af=--metrics=false bf=$frameflags
			fi
			log "same time: $w, frame beside $other, $first started first"
			line=$(WORK=$WORK/simul ROUNDS=$SIMUL_ROUNDS SECS=$SIMUL_SECS BASE_PORT=$((BASE_PORT + 40)) GEN="$g" WARM=$warm \
				A_FLAGS="$af" B_FLAGS="$bf" timeout 600 "$HERE/simulab.sh" "$a" "$b" 2>>"$WORK/simul.err" | tee -a "$WORK/simul.log" |
				awk '/^median B\/A/ {gsub(/[()]/, "", $7); split($7, r, "-"); print $3, r[1], r[2], $5}') || true
			if [[ -z $line ]]; then
				note "same time, $w beside $other: simulab.sh failed (see $WORK/simul.err)"
				continue
			fi
			read -r med lo hi n <<<"$line"
			# As frame's CPU over the other's: B/A when frame is B.
			if [[ $first == frame ]]; then
				read -r med lo hi <<<"$(awk -v m="$med" -v l="$lo" -v h="$hi" 'BEGIN {printf "%.3f %.3f %.3f", 1 / m, 1 / h, 1 / l}')"
			fi
			printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$other" "$first" "$med" "$lo" "$hi" "$n" >>"$SIMUL_RAW"
			log "same time: $w, frame/$other $med ($lo-$hi, $n rounds)"
		done
	done
fi

# ---------------------------------------------------------------- report
# median prints the median of the numbers on stdin, or - if there are none.
median() {
	sort -g | awk '$1 != "-" && $1 != "" {a[++n] = $1} END {
		if (n == 0) { print "-"; exit }
		if (n % 2) print a[(n + 1) / 2]; else print (a[n / 2] + a[n / 2 + 1]) / 2 }'
}
col() { # workload path column-name -> values of that column
	awk -F'\t' -v w="$1" -v p="$2" -v c="$3" 'NR == 1 {for (i = 1; i <= NF; i++) idx[$i] = i; next}
		$2 == w && $3 == p {print $idx[c]}' "$RAW"
}
med() { col "$1" "$2" "$3" | median; }
sum() { col "$1" "$2" "$3" | awk '{s += $1} END {print s + 0}'; }
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
	echo "- Machine: $NCPU CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) RAM, $(uname -sr), TCP congestion control $CC$([[ ${CC_SET:-0} == 1 ]] && echo " (TCP_CC; the host's is $CC_ORIG)"); load average at the end $(cut -d' ' -f1-3 /proc/loadavg)."
	echo "- Pinning: $PINNING.$([[ " ${ACTIVE[*]} " == *-unpinned\ * ]] && echo " The *-unpinned paths are not pinned (taskset -c 0-$((NCPU - 1))): frame-unpinned runs with GOMAXPROCS=2, haproxy-unpinned with nbthread 2; they share CPU 1 with the load generator and the backends.")"
	echo "- Versions: $(go version | awk '{print $3}'), streamlb $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet 2>/dev/null || echo '+dirty')$(command -v haproxy >/dev/null && echo ", $(haproxy -v | head -1 | awk '{print "HAProxy", $3}')")$(command -v nginx >/dev/null && echo ", $(nginx -v 2>&1 | sed 's|.*nginx/|nginx |')")."
	echo "- Command: \`$([[ ${CC_SET:-0} == 1 ]] && echo "TCP_CC=$CC ")PATHS=\"$PATHS\" WORKLOADS=\"${WORKLOADS[*]}\" QUICK=$QUICK ROUNDS=$ROUNDS UNARY_CALLS=$UNARY_CALLS RATE=$RATE RATE_SECS=$RATE_SECS STREAM_CALLS=$STREAM_CALLS MAX_SECS=$MAX_SECS IDLE_CONNS=$IDLE_CONNS IDLE_SETTLE=$IDLE_SETTLE IDLE_CALL=$IDLE_CALL SIMUL_ROUNDS=$SIMUL_ROUNDS SIMUL_SECS=$SIMUL_SECS loadtest/bench/run.sh\` ($ROUNDS rounds, paths interleaved, medians shown; run took ${ELAPSED}s)."
	echo "- Every workload runs over ONE client connection (client-rr: one per backend); the proxies balance per call over 3 backends. Load generator: loadtest/bench/gen (grpc-go)."
	echo "- CPU is the proxy process's CPU time over the workload as the scheduler counts it (its threads' /proc/PID/task/TID/schedstat; nginx: master and worker), per call; peak RSS is its VmHWM at the end of the run (all workloads; HAProxy and nginx: summed over their processes); peak RssAnon is the largest anonymous RSS sampled every 0.1 s during this workload, over the rounds; the frame paths run the production build (\`CGO_ENABLED=0 go build -tags proxyonly,grpcnotrace,urfave_cli_no_docs\`), frame-full the full \`go build .\`; backend conns are its established connections to the backends after the workload (last round); failed is summed over the rounds; backends' CPU is the three backends' together, per call (they share CPU 1 with the load generator, so what a proxy costs them lowers every path's calls/s); generator's CPU is the load generator's own (getrusage), per call: CPU 1 runs it and the backends and is what bounds calls/s, so a path's calls/s against client-rr follows the two CPU-1 figures of client-rr over its own; backends' runs are how many times their threads were put on a CPU (the third field of schedstat), per call: a proxy on CPU 0 wakes them with fewer calls each time than a client sharing their CPU does."
	echo
	for w in "${WORKLOADS[@]}"; do
		echo "### $w: ${WDESC[$w]}"
		echo
		if [[ $w == stream ]]; then
			unit="CPU ms/MiB" per="/MiB"
		else
			unit="CPU µs/call" per="/call"
		fi
		echo "| path | calls/s | vs client-rr | p50 ms | p99 ms | p50 added | p99 added | $unit | vs HAProxy | vs nginx | peak RSS MiB | peak RssAnon MiB | failed | backend conns | backends' $unit | backends' runs $per | generator's $unit | split |"
		echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
		d50=$(med "$w" direct p50_ms)
		d99=$(med "$w" direct p99_ms)
		rr=$(med "$w" client-rr rps)
		hcpu=$(med "$w" haproxy cpu_us_per_call)
		ncpu=$(med "$w" nginx cpu_us_per_call)
		for path in "${ACTIVE[@]}"; do
			rps=$(med "$w" "$path" rps)
			p50=$(med "$w" "$path" p50_ms)
			p99=$(med "$w" "$path" p99_ms)
			cpu=$(med "$w" "$path" cpu_us_per_call)
			hc=$hcpu nc=$ncpu
			if [[ $path == *-tls ]]; then # TLS paths compare with TLS paths
				hc=$(med "$w" haproxy-tls cpu_us_per_call)
				nc=$(med "$w" nginx-tls cpu_us_per_call)
			elif [[ $path == *-unpinned ]]; then # unpinned with unpinned, if it ran
				uh=$(med "$w" haproxy-unpinned cpu_us_per_call)
				[[ $uh != - ]] && hc=$uh
			fi
			if [[ $w == stream && $cpu != - ]]; then
				shown=$(fmt "$(awk -v c="$cpu" 'BEGIN {print c / 1000}')" 2) # 1 MiB per call
			else
				shown=$(fmt "$cpu" 1)
			fi
			rss=-
			has_proc "$path" && rss=$(fmt "$(awk -v k="${RSS[$path]}" 'BEGIN {print k / 1024}')" 1)
			anonpk=$(col "$w" "$path" anon_peak_kib | awk '$1 != "-" && $1 > m {m = $1} END {if (m) printf "%.1f", m / 1024; else print "-"}')
			split=$(col "$w" "$path" split | tail -1)
			conns=$(col "$w" "$path" backend_conns | tail -1)
			bcpu=$(med "$w" "$path" backends_us_per_call)
			gcpu=$(med "$w" "$path" gen_us_per_call)
			bruns=$(fmt "$(med "$w" "$path" backends_runs_per_call)" 3)
			if [[ $w == stream ]]; then
				bshown=$(fmt "$([[ $bcpu != - ]] && awk -v c="$bcpu" 'BEGIN {print c / 1000}')" 2)
				gshown=$(fmt "$([[ $gcpu != - ]] && awk -v c="$gcpu" 'BEGIN {print c / 1000}')" 2)
			else
				bshown=$(fmt "$bcpu" 1) gshown=$(fmt "$gcpu" 1)
			fi
			if [[ $path == direct ]]; then
				a50=- a99=-
			else
				a50=$(added "$p50" "$d50") a99=$(added "$p99" "$d99")
			fi
			echo "| $path | $(fmt "$rps" 0) | $(ratio "$rps" "$rr") | $(fmt "$p50" 2) | $(fmt "$p99" 2) | $a50 | $a99 | $shown | $(ratio "$cpu" "$hc") | $(ratio "$cpu" "$nc") | $rss | $anonpk | $(sum "$w" "$path" errors) | ${conns:--} | $bshown | $bruns | $gshown | ${split:--} |"
		done
		echo
	done
	echo "TLS paths (\`*-tls\`) are compared with HAProxy and nginx terminating TLS too; \`*-unpinned\` paths with haproxy-unpinned when it ran."
	echo
	echo "Per round, CPU µs per call (unary, rate) and per 1 MiB stream call (stream), to show the drift:"
	echo
	echo "| workload | path | $(for ((r = 1; r <= ROUNDS; r++)); do printf 'round %d | ' "$r"; done)"
	echo "|---|---|$(for ((r = 1; r <= ROUNDS; r++)); do printf -- '---:|'; done)"
	for w in "${WORKLOADS[@]}"; do
		for path in "${ACTIVE[@]}"; do
			has_proc "$path" || continue
			printf '| %s | %s | ' "$w" "$path"
			for ((r = 1; r <= ROUNDS; r++)); do
				v=$(awk -F'\t' -v r="$r" -v w="$w" -v p="$path" '$1 == r && $2 == w && $3 == p {print $10}' "$RAW")
				printf '%s | ' "${v:--}"
			done
			echo
		done
	done
	if (($(wc -l <"$IDLE_RAW") > 1)); then
		echo
		echo "### idle: $IDLE_CONNS idle HTTP/2 (h2c) client connections, handshake done, a fresh process each"
		echo
		[[ -n $IDLE_CALL ]] && echo "The second line of each server: every connection made one call ($IDLE_CALL, an empty message) before going idle."
		echo
		echo "| server | first | connections open | RSS before MiB | RSS after MiB | RSS per idle connection KiB |"
		echo "|---|---|---:|---:|---:|---:|"
		tail -n +2 "$IDLE_RAW" | while IFS=$'\t' read -r p c n open b a k; do
			first="handshake only"
			[[ $c != - ]] && first="one call"
			echo "| $p | $first | $open of $n | $(fmt "$(awk -v x="$b" 'BEGIN {print x / 1024}')" 1) | $(fmt "$(awk -v x="$a" 'BEGIN {print x / 1024}')" 1) | $k |"
		done
	fi
	if (($(wc -l <"$SIMUL_RAW") > 1)); then
		echo
		echo "### same time: the production build beside HAProxy or nginx"
		echo
		echo "CPU per call (per MiB for stream) of frame over the other's, both pinned to CPU 0 AT THE SAME TIME, each with its own generator on CPU 1 (\`simulab.sh\`, $SIMUL_ROUNDS rounds of ${SIMUL_SECS}s per line; frame with metrics on and scraped). Medians over the rounds, the range in brackets; the two lines of a workload differ in which proxy was started first."
		echo
		echo "| workload | frame over | started first | frame's CPU over the other's | rounds |"
		echo "|---|---|---|---:|---:|"
		tail -n +2 "$SIMUL_RAW" | while IFS=$'\t' read -r w o f m l h n; do
			echo "| $w | $o | $f | $(fmt "$m" 2)× ($(fmt "$l" 2)-$(fmt "$h" 2)) | $n |"
		done
	fi
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
