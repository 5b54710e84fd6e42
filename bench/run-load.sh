#!/usr/bin/env bash
# make bench-load: extauthz on a warmed cache of KEYS keys against the
# project's baseline servers (noop: the gRPC floor; ideal: parse + HMAC +
# map lookup), with the same requests, at each concurrency, alternating
# servers within each round. Servers share one core, the load generator has
# the other. Prints every run, then medians and ratios.
#
#   ROUNDS=3 DURATION=10s KEYS=100000 CONCURRENCY="16 64" bench/run-load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3} dur=${DURATION:-10s} keys=${KEYS:-100000} concs=${CONCURRENCY:-16 64}
server_cpu=${SERVER_CPU:-0} load_cpu=${LOAD_CPU:-1}
pin() { if command -v taskset >/dev/null; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
# For servers started in the background: exec, so that $! is the server's
# own pid (its CPU time is read from /proc), not a subshell's.
pin_exec() { if command -v taskset >/dev/null; then exec taskset -c "$1" "${@:2}"; else exec "${@:2}"; fi; }

dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

echo "building" >&2
go build -o "$dir/extauthz" ./cmd/extauthz
go build -o "$dir/baseline" ./bench/baseline
go build -o "$dir/loadgen" ./bench/loadgen

echo "importing $keys keys into extauthz's file store" >&2
"$dir/loadgen" -keys "$keys" -export-keys | EXTAUTHZ_DATA_DIR="$dir/data" "$dir/extauthz" keys import >/dev/null

ports=(19001 19191 19192)
labels=(extauthz noop ideal)
EXTAUTHZ_DATA_DIR="$dir/data" EXTAUTHZ_GRPC_ADDR=127.0.0.1:${ports[0]} EXTAUTHZ_HTTP_ADDR=127.0.0.1:0 \
	EXTAUTHZ_ADMIN_ADDR=127.0.0.1:0 EXTAUTHZ_LOG_LEVEL=warn EXTAUTHZ_CACHE_SIZE=$((keys * 2)) \
	pin_exec "$server_cpu" "$dir/extauthz" serve 2>"$dir/extauthz.log" &
pids+=($!)
pin_exec "$server_cpu" "$dir/baseline" -mode noop -addr 127.0.0.1:${ports[1]} -keys "$keys" 2>"$dir/noop.log" &
pids+=($!)
pin_exec "$server_cpu" "$dir/baseline" -mode ideal -addr 127.0.0.1:${ports[2]} -keys "$keys" 2>"$dir/ideal.log" &
pids+=($!)

cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

for i in 0 1 2; do
	for _ in $(seq 100); do
		(echo >"/dev/tcp/127.0.0.1/${ports[$i]}") 2>/dev/null && break
		sleep 0.1
	done
	echo "warming ${labels[$i]}: $(pin "$load_cpu" "$dir/loadgen" -addr 127.0.0.1:${ports[$i]} -keys "$keys" -c 16 -warm)" >&2
done

results="$dir/results"
for round in $(seq "$rounds"); do
	for c in $concs; do
		for i in 1 2 0; do
			t0=$(cpu_ticks "${pids[$i]}")
			line=$(pin "$load_cpu" "$dir/loadgen" -addr 127.0.0.1:${ports[$i]} -keys "$keys" -c "$c" -d "$dur" -label "${labels[$i]}")
			t1=$(cpu_ticks "${pids[$i]}")
			count=${line##*count=}
			cpu=$(awk -v t="$((t1 - t0))" -v hz="$hz" -v n="$count" 'BEGIN { printf "%.1f", (n > 0) ? t * 1e6 / hz / n : 0 }')
			echo "round=$round $line server_cpu_us_per_req=$cpu" | tee -a "$results"
		done
	done
done
echo
"$dir/loadgen" -summarize <"$results"
