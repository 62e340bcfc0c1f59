#!/usr/bin/env bash
# loadtest/bench/simulab.sh compares the CPU per unary call of two proxy
# binaries by running them AT THE SAME TIME: both pinned to CPU 0, each
# driven by its own generator (loadtest/bench/gen -c 50, full speed) on
# CPU 1 over the same three backends, so that both see the same
# interference from whatever else runs on the machine. run.sh interleaves
# paths instead, which a shared machine's drift between rounds can swamp
# for changes of a few percent. Each round starts a fresh pair and prints
# both CPU figures (the scheduler's CPU time of its threads, per call) and B/A.
# Swap A and B for a second run to cancel any advantage of the order.
#
#   loadtest/bench/simulab.sh A_BIN B_BIN
#
# A or B may instead be the word haproxy or nginx: that side is then
# HAProxy or nginx with run.sh's configuration (haproxy.cfg, nginx.conf:
# one thread or worker, per-call balancing over the same backends), pinned
# to CPU 0 as well, its CPU summed over its processes. That gives the
# issue's ratios to HAProxy and nginx from two proxies that share every
# moment of the machine, where run.sh's interleaved rounds can only
# share its minutes.
#
# Knobs (environment): ROUNDS (8), SECS (5), BASE_PORT (24400; uses
# BASE_PORT+1..3 for the backends, +10 and +20 for the proxies), WORK (a
# directory with streamlb (full build, for the testservers) and gen;
# built from this checkout when missing), A_FLAGS and B_FLAGS (each
# proxy's flags, `--metrics=false` by default; with `--metrics=true
# --admin-listen HOST:PORT` the admin listener is scraped once a second,
# as run.sh does), GEN (the workload's generator flags, `-c 50` by
# default; `-stream -c 4` for 1 MiB server streams: a call is a MiB),
# WARM (warm-up calls per proxy, 3000), SPLIT (0; 1 gives B three
# backends of its own, at BASE_PORT+4..6, see below).
#
# With shared backends a proxy that costs the backends more per call (a
# larger header block, more frames or wake-ups) slows both sides alike:
# the calls made stay equal and only the proxies' own CPU shows. SPLIT=1
# gives each side its own three backends (still all on CPU 1), so that
# what a proxy costs its backends and its generator shows in the calls it
# makes; each round then also prints the calls made and each side's
# backends' CPU per call and runs per call (how often their threads were
# put on a CPU, schedstat's third field), and the summary their medians
# B/A.
set -euo pipefail
A=${1:?usage: simulab.sh A_BIN B_BIN}
B=${2:?usage: simulab.sh A_BIN B_BIN}
ROUNDS=${ROUNDS:-8} SECS=${SECS:-5} PB=${BASE_PORT:-24400}
# shellcheck disable=SC2034 # AF and BF are read through start's nameref
read -r -a AF <<<"${A_FLAGS:---metrics=false}"
# shellcheck disable=SC2034
read -r -a BF <<<"${B_FLAGS:---metrics=false}"
read -r -a GF <<<"${GEN:--c 50}"
SPLIT=${SPLIT:-0}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/simulab.XXXXXX")}
[[ -x $WORK/streamlb ]] || (cd "$REPO" && go build -o "$WORK/streamlb" .)
[[ -x $WORK/gen ]] || (cd "$REPO" && go build -o "$WORK/gen" ./loadtest/bench/gen)
pids=() round=()
HERE=$REPO/loadtest/bench
# shellcheck source=loadtest/bench/lib.sh
source "$HERE/lib.sh"
# Everything started is killed on the way out, the round's proxies and
# scrapers too: a failed generator (set -e) must not leave the script
# waiting on them.
cleanup() { kill "${pids[@]}" "${round[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
start_backends "$WORK/streamlb" "$PB" "$WORK/testserver.log"
backends_up "$PB" "$WORK/testserver.log" || exit 1
# B's backends: its own set with SPLIT=1, else A's.
BB=$PB
if [[ $SPLIT == 1 ]]; then
	BB=$((PB + 3))
	start_backends "$WORK/streamlb" "$BB" "$WORK/testserver.log"
	backends_up "$BB" "$WORK/testserver.log" "" 3 || exit 1
fi
# cpu prints the CPU time in ns of process $1 and its children (nginx's
# worker; a streamlb or HAProxy process has none): the sum over their
# threads of the first field of /proc/PID/task/TID/schedstat, the
# scheduler's own count. /proc/PID/stat's user and system time come in
# 10 ms ticks, 1-2% of a round's figure here, as much as the differences
# this script is for.
cpu() {
	local p
	for p in $1 $(pgrep -P "$1" 2>/dev/null || true); do
		cat /proc/"$p"/task/*/schedstat 2>/dev/null || true
	done | awk '{t += $1} END {printf "%.0f\n", t}' # not %d: mawk's stops at 2^31-1
}
# sched prints the CPU time in ns and the runs (schedstat's third field:
# how often a thread was put on a CPU) of the processes given, summed over
# their threads.
sched() {
	local p
	for p in "$@"; do
		cat /proc/"$p"/task/*/schedstat 2>/dev/null || true
	done | awk '{t += $1; n += $3} END {printf "%.0f %.0f\n", t, n}'
}
for side in "$A" "$B"; do
	case $side in
	haproxy | nginx) command -v "$side" >/dev/null || { echo "simulab: $side is not installed" >&2; exit 1; } ;;
	*) [[ -x $side ]] || { echo "simulab: $side is not an executable" >&2; exit 1; } ;;
	esac
done
# start starts side $1 (a streamlb binary, haproxy or nginx) on CPU 0,
# listening on port $2, with the proxy flags in the array named $3, in
# front of the backends at $4+1 to $4+3; it sets STARTED to the pid whose
# CPU counts.
start() {
	local name=sim-$2 bp=$4
	case $1 in
	haproxy | nginx)
		local tmpl=$HERE/haproxy.cfg bind="proto h2"
		[[ $1 == nginx ]] && tmpl=$HERE/nginx.conf bind=http2
		sed -e "s|@PORT@|$2|g" -e "s|@B1@|$((bp + 1))|g" -e "s|@B2@|$((bp + 2))|g" -e "s|@B3@|$((bp + 3))|g" \
			-e "s|@DIR@|$WORK|g" -e "s|@NAME@|$name|g" -e "s|@BIND@|$bind|g" -e "s|@LISTEN@|$bind|g" \
			-e "s|@TLS@||g" -e "s|@THREADS@|1|g" "$tmpl" >"$WORK/$name.conf"
		if [[ $1 == haproxy ]]; then
			taskset -c 0 haproxy -db -f "$WORK/$name.conf" >"$WORK/$name.log" 2>&1 &
		else
			taskset -c 0 nginx -p "$WORK/" -c "$WORK/$name.conf" >"$WORK/$name.log" 2>&1 &
		fi
		;;
	*)
		local -n flags=$3
		taskset -c 0 "$1" proxy --listen 127.0.0.1:"$2" --backend 127.0.0.1:$((bp + 1)) --backend 127.0.0.1:$((bp + 2)) \
			--backend 127.0.0.1:$((bp + 3)) "${flags[@]}" --log-level warn &
		;;
	esac
	STARTED=$!
}
count() { grep -o '"count":[0-9]*' "$1" | head -1 | cut -d: -f2; }
for r in $(seq 1 "$ROUNDS"); do
	start "$A" $((PB + 10)) AF "$PB"
	pa=$STARTED
	start "$B" $((PB + 20)) BF "$BB"
	pb=$STARTED
	round=($pa $pb)
	sleep 1
	scrapers=()
	for f in "${A_FLAGS:-}" "${B_FLAGS:-}"; do
		if [[ $f =~ --admin-listen[=\ ]([0-9.:]+) ]]; then
			# run.sh's scraper, on the proxies' CPU as there.
			taskset -c 0 bash -c "$(declare -f scraper); scraper \"\$@\"" _ "$WORK/scrape-$RANDOM" "${BASH_REMATCH[1]##*:}" &
			scrapers+=($!)
			round+=($!)
		fi
	done
	backends_up "$PB" "$WORK/testserver.log" "round $r: " || exit 1
	[[ $SPLIT != 1 ]] || backends_up "$BB" "$WORK/testserver.log" "round $r: " 3 || exit 1
	for p in 10 20; do taskset -c 1 "$WORK/gen" "${GF[@]}" -n "${WARM:-3000}" -target 127.0.0.1:$((PB + p)) >/dev/null; done # warm-up
	a0=$(cpu $pa) b0=$(cpu $pb)
	if [[ $SPLIT == 1 ]]; then
		read -r ba0 ra0 <<<"$(sched "${pids[@]:0:3}")"
		read -r bb0 rb0 <<<"$(sched "${pids[@]:3:3}")"
	fi
	taskset -c 1 "$WORK/gen" "${GF[@]}" -duration "${SECS}s" -n 100000000 -target 127.0.0.1:$((PB + 10)) >"$WORK/a.json" &
	ga=$!
	taskset -c 1 "$WORK/gen" "${GF[@]}" -duration "${SECS}s" -n 100000000 -target 127.0.0.1:$((PB + 20)) >"$WORK/b.json"
	wait $ga
	a1=$(cpu $pa) b1=$(cpu $pb)
	if [[ $SPLIT == 1 ]]; then
		read -r ba1 ra1 <<<"$(sched "${pids[@]:0:3}")"
		read -r bb1 rb1 <<<"$(sched "${pids[@]:3:3}")"
	fi
	kill $pa $pb "${scrapers[@]}"
	wait $pa $pb "${scrapers[@]}" 2>/dev/null || true
	round=()
	awk -v r="$r" -v na="$(count "$WORK/a.json")" -v nb="$(count "$WORK/b.json")" -v a=$((a1 - a0)) -v b=$((b1 - b0)) 'BEGIN {
		ca = a / na / 1e3; cb = b / nb / 1e3
		printf "round %d  A %6d calls %6.2f µs/call   B %6d calls %6.2f µs/call   B/A %.3f\n", r, na, ca, nb, cb, cb / ca }' |
		tee -a "$WORK/simulab-ratios.$$"
	if [[ $SPLIT == 1 ]]; then
		awk -v na="$(count "$WORK/a.json")" -v nb="$(count "$WORK/b.json")" -v ba=$((ba1 - ba0)) -v bb=$((bb1 - bb0)) \
			-v ra=$((ra1 - ra0)) -v rb=$((rb1 - rb0)) 'BEGIN {
			ca = ba / na / 1e3; cb = bb / nb / 1e3
			printf "         backends: A %6.2f µs/call %.3f runs/call   B %6.2f µs/call %.3f runs/call   calls B/A %.3f   backends B/A %.3f\n", ca, ra / na, cb, rb / nb, nb / na, cb / ca }' |
			tee -a "$WORK/simulab-split.$$"
	fi
done
# The summary: the median of the rounds' B/A, and their range.
awk '{print $NF}' "$WORK/simulab-ratios.$$" | sort -g | awk '{a[++n] = $1} END {
	if (n) printf "median B/A %.3f over %d rounds (%.3f-%.3f)\n", (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2, n, a[1], a[n] }'
rm -f "$WORK/simulab-ratios.$$"
if [[ $SPLIT == 1 ]]; then
	for f in 'calls B/A' 'backends B/A'; do
		awk -v f="$f" '{for (i = 1; i <= NF; i++) if ($i " " $(i + 1) == f) print $(i + 2)}' "$WORK/simulab-split.$$" | sort -g |
			awk -v f="$f" '{a[++n] = $1} END {
			if (n) printf "median %s %.3f over %d rounds (%.3f-%.3f)\n", f, (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2, n, a[1], a[n] }'
	done
	rm -f "$WORK/simulab-split.$$"
fi
