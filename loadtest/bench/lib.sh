# shellcheck shell=bash
# loadtest/bench/lib.sh: what run.sh, simulab.sh, pgo.sh and memab.sh share.
# Sourced.

# scraper FILE PORT: GET /metrics from 127.0.0.1:PORT once a second, at
# most for an hour, reading the answer whole; FILE names its FIFO. It
# stands for Prometheus, which runs elsewhere, so it must take next to
# nothing from the CPUs: bash builtins only (/dev/tcp, `read -N`, which
# reads a socket in large chunks) and `read -t` on a FIFO nobody writes
# instead of forking sleep(1). The version before forked sleep(1) and
# curl(1) each second: 12-14 ms of CPU per scrape, about 1.4% of CPU 1, the
# generator's and the backends' CPU, taken from the frame path's calls/s
# alone (HAProxy and nginx have no scraper); now about 1.5 ms, on CPU 0
# (perf stat -e task-clock of the loop, 5 scrapes).
scraper() {
	local file=$1 port=$2 fd sock chunk i LC_ALL=C
	mkfifo "$file.tick" && exec {fd}<>"$file.tick" && rm -f "$file.tick" || return 0
	for ((i = 0; i < 3600; i++)); do
		read -rt 1 -u "$fd" || true
		exec {sock}<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null || continue
		printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&"$sock"
		# shellcheck disable=SC2034 # chunk is read to be dropped
		while read -r -N 65536 -u "$sock" chunk; do :; done
		exec {sock}<&-
	done
	exec {fd}<&-
}

# start_backends BIN PB LOG: starts three `BIN testserver` backends on CPU
# 1, named b1-b3, at 127.0.0.1:PB+1 to PB+3, their errors appended to LOG,
# and appends their pids to the caller's array pids (empty before, or
# holding other sets of three: backends_up finds a set by its FIRST).
start_backends() {
	local i
	for i in 1 2 3; do
		taskset -c 1 "$1" testserver --listen 127.0.0.1:$(($2 + i)) --name b$i --log-level warn 2>>"$3" &
		pids+=($!)
	done
}

# up PORT: whether 127.0.0.1:PORT accepts a connection.
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# backends_up PB LOG [PREFIX [FIRST]]: waits up to 10 s for the three
# backends start_backends started at PB to accept connections, and fails at
# once if one exited (its port taken), saying so on stderr after PREFIX.
# FIRST is the index in pids of the set's first backend (0: the first set).
backends_up() {
	local i t first=${4:-0}
	for i in 1 2 3; do
		for t in $(seq 50); do
			kill -0 "${pids[first + i - 1]}" 2>/dev/null || break
			up $(($1 + i)) && continue 2
			sleep 0.2
		done
		echo "$(basename "$0"): ${3:-}backend 127.0.0.1:$(($1 + i)) is not serving (port taken? see $2)" >&2
		return 1
	done
}
