# shellcheck shell=bash
# loadtest/bench/lib.sh: what run.sh, simulab.sh and memab.sh share.
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
