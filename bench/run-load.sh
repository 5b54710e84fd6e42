#!/usr/bin/env bash
# make bench-load: extauthz on a warmed cache of KEYS keys against the
# project's baseline servers (noop: the gRPC floor; ideal: parse + HMAC +
# map lookup), with the same requests, at each concurrency, alternating
# servers within each round. Servers share one core, the load generator has
# the other. Prints every run, then medians and ratios.
#
#   ROUNDS=3 DURATION=10s KEYS=100000 CONCURRENCY="16 64" bench/run-load.sh
#
# The key store is Postgres, as in production, when STORE=postgres (the
# default when psql reaches BENCH_POSTGRES, default
# postgres://postgres@127.0.0.1:5432/postgres): the script creates a
# database of its own there and drops it at the end. STORE=file uses the
# embedded file store instead, whose in-memory copy of every key adds
# about 55 MB of live heap at 100,000 keys (more garbage-collector work).
#
# The cache TTL is 1h, so that the warmed cache outlasts the run: the
# default 5m would turn every check into a store lookup halfway through.
#
# Usage is recorded on every check but written every USAGE_INTERVAL
# (default 1h, so outside the measured windows); USAGE_INTERVAL=1m shows
# its cost. (The file store writes by rewriting its whole file, 44 MB at
# 100,000 keys.)
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

pg=${BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
store=${STORE:-}
if [ -z "$store" ]; then
	store=file
	if command -v psql >/dev/null && psql "$pg" -Atqc 'select 1' >/dev/null 2>&1; then store=postgres; fi
fi
export EXTAUTHZ_DATA_DIR="$dir/data"
if [ "$store" = postgres ]; then
	db="extauthz_bench_$$"
	psql "$pg" -qc "create database $db"
	trap 'cleanup; psql "$pg" -qc "drop database if exists $db (force)" || true' EXIT
	export EXTAUTHZ_STORE="${pg%/*}/$db?sslmode=disable"
	EXTAUTHZ_HMAC_SECRETS="bench:$(head -c 32 /dev/urandom | base64 | tr -d '=+/')"
	export EXTAUTHZ_HMAC_SECRETS
	"$dir/extauthz" migrate >/dev/null
fi
echo "importing $keys keys into extauthz ($store store)" >&2
"$dir/loadgen" -keys "$keys" -export-keys | "$dir/extauthz" keys import >/dev/null

ports=(19001 19002 19191 19192)
labels=(extauthz extauthz-proto noop ideal)
# extauthz-proto is the same server with the stock protobuf codec
# (EXTAUTHZ_GRPC_CODEC=proto), to show what the lean codec is worth. With
# the file store each has its own copy, so that neither reloads the other's
# writes.
if [ "$store" = file ]; then cp -r "$dir/data" "$dir/data-proto"; fi
start_extauthz() {
	EXTAUTHZ_DATA_DIR="$dir/data$3" EXTAUTHZ_GRPC_ADDR=127.0.0.1:$1 EXTAUTHZ_HTTP_ADDR=127.0.0.1:0 \
		EXTAUTHZ_ADMIN_ADDR=127.0.0.1:0 EXTAUTHZ_LOG_LEVEL=warn EXTAUTHZ_CACHE_SIZE=$((keys * 2)) \
		EXTAUTHZ_USAGE_INTERVAL=${USAGE_INTERVAL:-1h} EXTAUTHZ_CACHE_TTL=1h \
		EXTAUTHZ_GRPC_CODEC=$2 pin_exec "$server_cpu" "$dir/extauthz" serve 2>"$dir/extauthz-$2.log"
}
start_extauthz "${ports[0]}" lean "" &
pids+=($!)
start_extauthz "${ports[1]}" proto -proto &
pids+=($!)
pin_exec "$server_cpu" "$dir/baseline" -mode noop -addr 127.0.0.1:${ports[2]} -keys "$keys" 2>"$dir/noop.log" &
pids+=($!)
pin_exec "$server_cpu" "$dir/baseline" -mode ideal -addr 127.0.0.1:${ports[3]} -keys "$keys" 2>"$dir/ideal.log" &
pids+=($!)

cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

for i in 0 1 2 3; do
	for _ in $(seq 100); do
		(echo >"/dev/tcp/127.0.0.1/${ports[$i]}") 2>/dev/null && break
		sleep 0.1
	done
	echo "warming ${labels[$i]}: $(pin "$load_cpu" "$dir/loadgen" -addr 127.0.0.1:${ports[$i]} -keys "$keys" -c 16 -warm)" >&2
done

results="$dir/results"
for round in $(seq "$rounds"); do
	for c in $concs; do
		for i in 2 3 0 1; do
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
