#!/usr/bin/env bash
# loadtest/bench/memab.sh compares the memory and CPU of streamlb proxy
# variants (builds, flags, environment) under run.sh's frame workloads,
# interleaved: each variant is a proxy of its own on CPU 0 (metrics on, an
# admin listener scraped every second, as run.sh's frame path), three
# testservers and the generator on CPU 1; per round, unary (20,000 calls
# or 3 s, concurrency 50), rate (2,000 calls/s for 5 s) and stream (300 x
# 1 MiB or 3 s, concurrency 4) run through every variant in turn. It
# prints per variant: VmHWM at the end, RssFile at the end, the largest
# RssAnon sampled every 0.1 s per workload, and CPU per call (per MiB for
# streams) over all rounds.
#
# Usage: loadtest/bench/memab.sh "NAME|ENV=V ...|BINARY|extra proxy flags" ...
# e.g.   loadtest/bench/memab.sh "base||/tmp/old|" "win|GOGC=50|/tmp/new|--backend-stream-window-max 262144"
# Knobs: ROUNDS (3), PORT0 (26300; uses PORT0+1..3 and PORT0+10 up),
# FULL (a full streamlb build for the backends; built if unset), GEN
# (loadtest/bench/gen; built if unset), OUTD (work dir).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=loadtest/bench/lib.sh
source "$HERE/lib.sh"
P=${PORT0:-26300}; ROUNDS=${ROUNDS:-3}; OUTD=${OUTD:-$(mktemp -d "${TMPDIR:-/tmp}/streamlb-memab.XXXXXX")}; mkdir -p "$OUTD"
if [[ -z ${FULL:-} ]]; then FULL=$OUTD/streamlb; (cd "$REPO" && go build -o "$FULL" .) || exit 1; fi
if [[ -z ${GEN:-} ]]; then GEN=$OUTD/gen; (cd "$REPO" && go build -o "$GEN" ./loadtest/bench/gen) || exit 1; fi
PIDS=()
cleanup(){ rm -f $OUTD/*.on; for p in "${PIDS[@]}"; do kill $p 2>/dev/null||true; done; wait 2>/dev/null||true; }
trap cleanup EXIT
wp(){ for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }
for i in 1 2 3; do taskset -c 1 $FULL testserver --listen 127.0.0.1:$((P+i)) --name b$i --log-level warn >$OUTD/b$i.log 2>&1 & PIDS+=($!); done
for i in 1 2 3; do wp $((P+i)); done
declare -A PP PORT
NAMES=(); k=0
for c in "$@"; do
  IFS='|' read -r name envs bin flags <<<"$c"
  NAMES+=($name); port=$((P+10+k*2)); adm=$((port+1)); k=$((k+1)); PORT[$name]=$port
  env $envs taskset -c 0 $bin proxy --listen 127.0.0.1:$port --backend 127.0.0.1:$((P+1)) --backend 127.0.0.1:$((P+2)) --backend 127.0.0.1:$((P+3)) \
    --engine frame --admin-listen 127.0.0.1:$adm --log-level warn $flags >$OUTD/$name.log 2>&1 &
  PP[$name]=$!; PIDS+=($!)
  wp $port; wp $adm
  taskset -c 0 bash -c "$(declare -f scraper); scraper \"\$@\"" _ "$OUTD/scrape-$name" "$adm" & PIDS+=($!) # as run.sh's

done
sleep 1
for n in "${NAMES[@]}"; do printf "%s start: %s\n" $n "$(awk '/^VmRSS|^RssAnon|^RssFile/{printf "%s %s ", $1, $2}' /proc/${PP[$n]}/status)"; done
for n in "${NAMES[@]}"; do timeout 60 taskset -c 1 $GEN -c 10 -n 2000 -target 127.0.0.1:${PORT[$n]} >/dev/null; done
tick(){ cat /proc/$1/task/*/schedstat | awk '{t += $1} END {printf "%.0f\n", t}'; } # CPU ns, as run.sh's cpu_ns
samp(){ local f=$1 pid=$2 m=0 a; while [[ -e $f.on ]]; do a=$(awk '/^RssAnon:/{print $2}' /proc/$pid/status); ((a>m)) && m=$a; echo $m > $f; sleep 0.1; done; }
declare -A T N A
for r in $(seq $ROUNDS); do
 for w in unary rate stream; do
  case $w in unary) a="-c 50 -n 20000 -duration 3s";; rate) a="-c 50 -rate 2000 -duration 5s";; stream) a="-stream -c 4 -n 300 -duration 3s";; esac
  for n in "${NAMES[@]}"; do
   pid=${PP[$n]}; f=$OUTD/anon-$n-$w-$r; touch $f.on; samp $f $pid & sp=$!
   b=$(tick $pid); taskset -c 1 $GEN $a -target 127.0.0.1:${PORT[$n]} > $OUTD/$n-$w-$r.json; e=$(tick $pid)
   rm -f $f.on; wait $sp
   c=$(jq .count $OUTD/$n-$w-$r.json); er=$(jq .errors $OUTD/$n-$w-$r.json); ((er>0)) && echo "ERRORS $n $w $r: $er"
   T[$n,$w]=$(( ${T[$n,$w]:-0} + e - b )); N[$n,$w]=$(( ${N[$n,$w]:-0} + c ))
   am=$(cat $f); (( am > ${A[$n,$w]:-0} )) && A[$n,$w]=$am
  done
 done
done
for n in "${NAMES[@]}"; do
 pid=${PP[$n]}
 printf "%-14s VmHWM %5.1f MiB  end RssFile %5.1f  peak RssAnon unary/rate/stream %4.1f/%4.1f/%4.1f MiB | us/call unary %5.1f rate %5.1f | us/MiB stream %6.0f | calls %s/%s/%s\n" $n \
  $(echo "$(awk '/^VmHWM:/{print $2}' /proc/$pid/status)/1024" | bc -l) $(echo "$(awk '/^RssFile:/{print $2}' /proc/$pid/status)/1024" | bc -l) \
  $(echo "${A[$n,unary]}/1024" | bc -l) $(echo "${A[$n,rate]}/1024" | bc -l) $(echo "${A[$n,stream]}/1024" | bc -l) \
  $(echo "${T[$n,unary]}/1000/${N[$n,unary]}" | bc -l) $(echo "${T[$n,rate]}/1000/${N[$n,rate]}" | bc -l) $(echo "${T[$n,stream]}/1000/${N[$n,stream]}" | bc -l) \
  ${N[$n,unary]} ${N[$n,rate]} ${N[$n,stream]}
done
echo "out=$OUTD"
