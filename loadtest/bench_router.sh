#!/usr/bin/env bash
# gatehouse db as a router with 0, 1 and 2 replicas, against PgBouncer
# (which cannot route) and direct PostgreSQL, in one run.
#
# Starts its own primary (initdb in a scratch directory) and two streaming
# replicas of it (pg_basebackup -R), all on this machine; PgBouncer in
# transaction mode in front of the primary; and three gatehouse db, in
# front of the primary alone, the primary and one replica, and the primary
# and both replicas, every pool the same size. Then pgbench -S (select only)
# through each, -M simple and extended, 50 clients. Prints tps, average
# latency and the pooler's CPU time per transaction, then the ratios, and
# where each gatehouse sent its reads (from its /metrics).
#
# Every node shares the same cores here: a replica adds no CPU, so reads
# cannot scale with replicas on one machine; what the run shows is the
# router's own cost per transaction (classification, choice, the topology
# monitor) and that reads do land on the replicas.
#
# Usage: loadtest/bench_router.sh [seconds-per-run=10] [rounds=2] [pool-size=20]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
rounds=${2:-2}
pool=${3:-20}

source loadtest/lib_pg.sh

dir=$(mktemp -d)
chmod 755 "$dir"
owner=()
if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; owner=(runuser -u postgres --); fi
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$dir/pgb/pgbouncer.pid" ] && kill "$(cat "$dir/pgb/pgbouncer.pid")" 2>/dev/null || true
  for data in "$dir"/data*; do
    "${owner[@]}" "$BIN/pg_ctl" stop -D "$data" -m immediate >/dev/null 2>&1 || true
  done
  rm -rf "$dir"
}
trap cleanup EXIT

PG=$(free_port); R1=$(free_port); R2=$(free_port); PGB=$(free_port)
modes=${MODES:-simple extended}
targets="direct pgbouncer gh0 gh1 gh2"

start_pg() { # data-dir port
  "${owner[@]}" "$BIN/pg_ctl" start -w -D "$1" -l "$1.log" \
    -o "-p $2 -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off -c synchronous_commit=off" >/dev/null
}
"${owner[@]}" "$BIN/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync >/dev/null
start_pg "$dir/data" "$PG"
"$BIN/psql" -h "$dir" -p "$PG" -U postgres -qc "CREATE DATABASE bench"
"$BIN/pgbench" -h "$dir" -p "$PG" -U postgres -i -s 10 -q bench 2>/dev/null
for replica in 1 2; do
  port=$([ $replica = 1 ] && echo "$R1" || echo "$R2")
  "${owner[@]}" "$BIN/pg_basebackup" -h "$dir" -p "$PG" -U postgres -D "$dir/data$replica" -R -X stream -c fast
  start_pg "$dir/data$replica" "$port"
done
for port in $R1 $R2; do
  for _ in $(seq 100); do
    "$BIN/psql" -h 127.0.0.1 -p "$port" -U postgres -Atqc "SELECT count(*) FROM pgbench_branches" bench >/dev/null 2>&1 && break
    sleep 0.2
  done
done

start_pgbouncer "$PGB" "$pool"

declare -A gh_port gh_pid gh_admin
for n in 0 1 2; do
  mkdir -p "$dir/gh$n"
  gh_port[$n]=$(free_port); gh_admin[$n]=127.0.0.1:$(free_port)
  {
    printf '[server]\nsocket_dir = "%s"\nport = %s\n[admin]\nenabled = true\nlisten = "%s"\n' \
      "$dir/gh$n" "${gh_port[$n]}" "${gh_admin[$n]}"
    printf '[primary]\nhost = "127.0.0.1"\nport = %s\n' "$PG"
    [ "$n" -ge 1 ] && printf '[[nodes]]\nhost = "127.0.0.1"\nport = %s\n' "$R1"
    [ "$n" -ge 2 ] && printf '[[nodes]]\nhost = "127.0.0.1"\nport = %s\n' "$R2"
    printf '[pool]\nmin_connections = 0\nmax_connections = %s\nstatement_timeout = "0s"\n' "$pool"
    printf '[[users]]\nname = "postgres"\nauth = "trust"\n[[databases]]\nname = "bench"\n[log]\nlevel = "warn"\n'
  } > "$dir/gh$n/db.toml"
  setsid "$GATEHOUSE" db --config "$dir/gh$n/db.toml" 2>"$dir/gh$n/log" &
  pids+=($!)
  gh_pid[$n]=$!
  for _ in $(seq 50); do [ -S "$dir/gh$n/.s.PGSQL.${gh_port[$n]}" ] && break; sleep 0.1; done
done
sleep 2 # one topology round: the replicas are known

printf '%-9s %-10s %5s %10s %12s %14s\n' mode target round tps latency_ms pooler_cpu_us
declare -A best cpu_best
for mode in $modes; do
  for round in $(seq "$rounds"); do
    for target in $targets; do
      case $target in
        direct) host=$dir; port=$PG; pid=;;
        pgbouncer) host=$dir/pgb; port=$PGB; pid=$pgb_pid;;
        gh*) n=${target#gh}; host=$dir/gh$n; port=${gh_port[$n]}; pid=${gh_pid[$n]};;
      esac
      read -r tps lat cpu < <(measure "$host" "$port" "$mode" "$pid")
      printf '%-9s %-10s %5s %10s %12s %14s\n' "$mode" "$target" "$round" "$tps" "$lat" "$cpu"
      key="$mode/$target"
      if [ "$tps" != failed ] && { [ -z "${best[$key]:-}" ] || [ "$tps" -gt "${best[$key]}" ]; }; then
        best[$key]=$tps; cpu_best[$key]=$cpu
      fi
    done
  done
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a && b) printf "%.2fx", a/b; else print "-" }'; }
echo
echo "best of $rounds rounds, ${duration}s each, pgbench -S -c 50 -j 2, pool size $pool per node, $(nproc) cores"
echo "gh0: the primary alone; gh1: primary + 1 replica; gh2: primary + 2 replicas"
printf '%-9s %8s %9s %8s %8s %8s %10s %10s %10s\n' mode direct pgbouncer gh0 gh1 gh2 gh0/pgb gh1/pgb gh2/pgb
for mode in $modes; do
  p=${best[$mode/pgbouncer]:-0}
  printf '%-9s %8s %9s %8s %8s %8s %10s %10s %10s\n' "$mode" "${best[$mode/direct]:-failed}" "${p}" \
    "${best[$mode/gh0]:-failed}" "${best[$mode/gh1]:-failed}" "${best[$mode/gh2]:-failed}" \
    "$(ratio "${best[$mode/gh0]:-0}" "$p")" "$(ratio "${best[$mode/gh1]:-0}" "$p")" "$(ratio "${best[$mode/gh2]:-0}" "$p")"
  echo "  pooler CPU us/transaction: pgbouncer ${cpu_best[$mode/pgbouncer]:--} gh0 ${cpu_best[$mode/gh0]:--} gh1 ${cpu_best[$mode/gh1]:--} gh2 ${cpu_best[$mode/gh2]:--}"
done
echo
for n in 1 2; do
  echo "gh$n routed:"
  curl -s "http://${gh_admin[$n]}/metrics" | grep '^gatehouse_db_routed_transactions_total' | sed 's/^/  /'
done
