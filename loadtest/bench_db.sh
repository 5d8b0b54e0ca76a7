#!/usr/bin/env bash
# gatehouse db against PgBouncer and direct PostgreSQL, in one run.
#
# Starts its own PostgreSQL (initdb in a scratch directory), PgBouncer in
# transaction mode and gatehouse db in transaction mode, both with the same
# pool size, then runs pgbench -S (select-only) through each and directly:
# 50 clients, 2 threads, in -M simple, extended and prepared, and the same
# select with its parameter written into the text (`literals`: a new text
# each time, as Django's queries arrive). Prints tps and average latency,
# and the ratios. A run with failed transactions prints
# "failed" (PgBouncer before 1.21 cannot pool -M prepared in transaction
# mode: its clients get "prepared statement does not exist").
# Both poolers listen on a Unix socket and trust local clients, as Django on
# the same host would use them. Each server runs in a session of its own, as
# it does as a daemon or a systemd service: PgBouncer's -d and pg_ctl start
# one, gatehouse is started with setsid. Sharing the shell's session would put
# gatehouse in one scheduling group (autogroup) with pgbench, competing for
# the group's share of the CPU while PgBouncer has a group to itself.
#
# Also prints each pooler's CPU time per transaction (user + system, from
# /proc), which the machine's noise moves far less than tps.
#
# Usage: loadtest/bench_db.sh [seconds-per-run=10] [rounds=2] [pool-size=20]
# BASELINE=/path/to/another/gatehouse adds that build as a fourth target
# ("baseline"), to compare two builds in one run; MODES="simple extended"
# runs only those modes; GATEHOUSE_THREADS sets server.threads (0, the
# default, is one per core).
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
  # PgBouncer daemonizes: its pid is in its pidfile.
  [ -f "$dir/pgb/pgbouncer.pid" ] && kill "$(cat "$dir/pgb/pgbouncer.pid")" 2>/dev/null || true
  "${owner[@]}" "$BIN/pg_ctl" stop -D "$dir/data" -m immediate >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

PG=$(free_port); PGB=$(free_port); GH=$(free_port); GB=$(free_port)
modes=${MODES:-simple extended prepared literals}
targets="direct pgbouncer gatehouse"

"${owner[@]}" "$BIN/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync >/dev/null
"${owner[@]}" "$BIN/pg_ctl" start -w -D "$dir/data" -l "$dir/pg.log" \
  -o "-p $PG -k $dir -c listen_addresses='' -c max_connections=200 -c fsync=off -c synchronous_commit=off" >/dev/null
"$BIN/psql" -h "$dir" -p "$PG" -U postgres -qc "CREATE DATABASE bench" 
"$BIN/pgbench" -h "$dir" -p "$PG" -U postgres -i -s 10 -q bench 2>/dev/null

mkdir -p "$dir/gh"
start_pgbouncer "$PGB" "$pool"

cat > "$dir/gh/db.toml" <<CONF
[server]
socket_dir = "$dir/gh"
port = $GH
${GATEHOUSE_THREADS:+threads = $GATEHOUSE_THREADS}
[admin]
enabled = false
[primary]
host = "$dir"
port = $PG
[pool]
min_connections = 0
max_connections = $pool
statement_timeout = "0s"
[[users]]
name = "postgres"
auth = "trust"
[[databases]]
name = "bench"
pool_mode = "transaction"
[log]
level = "warn"
CONF
setsid "$GATEHOUSE" db --config "$dir/gh/db.toml" 2>"$dir/gh/log" &
pids+=($!)
gh_pid=$!
for _ in $(seq 50); do [ -S "$dir/gh/.s.PGSQL.$GH" ] && break; sleep 0.1; done
if [ -n "${BASELINE:-}" ]; then
  mkdir -p "$dir/gb"
  sed -e "s|$dir/gh|$dir/gb|" -e "s|^port = $GH|port = $GB|" "$dir/gh/db.toml" > "$dir/gb/db.toml"
  setsid "$BASELINE" db --config "$dir/gb/db.toml" 2>"$dir/gb/log" &
  pids+=($!)
  gb_pid=$!
  for _ in $(seq 50); do [ -S "$dir/gb/.s.PGSQL.$GB" ] && break; sleep 0.1; done
  targets="$targets baseline"
fi

printf '%-9s %-10s %5s %10s %12s %14s\n' mode target round tps latency_ms pooler_cpu_us
declare -A best
for mode in $modes; do
  for round in $(seq "$rounds"); do
    for target in $targets; do
      case $target in
        direct) host=$dir; port=$PG; pid=;;
        pgbouncer) host=$dir/pgb; port=$PGB; pid=$pgb_pid;;
        gatehouse) host=$dir/gh; port=$GH; pid=$gh_pid;;
        baseline) host=$dir/gb; port=$GB; pid=$gb_pid;;
      esac
      read -r tps lat cpu < <(measure "$host" "$port" "$mode" "$pid")
      printf '%-9s %-10s %5s %10s %12s %14s\n' "$mode" "$target" "$round" "$tps" "$lat" "$cpu"
      key="$mode/$target"
      if [ "$tps" != failed ] && { [ -z "${best[$key]:-}" ] || [ "$tps" -gt "${best[$key]}" ]; }; then
        best[$key]=$tps
      fi
    done
  done
done
echo
echo "best of $rounds rounds, ${duration}s each, pgbench -S -c 50 -j 2, pool size $pool, $(nproc) cores"
printf '%-9s %10s %10s %10s %18s %16s\n' mode direct pgbouncer gatehouse "gatehouse/pgbouncer" "gatehouse/direct"
for mode in $modes; do
  d=${best[$mode/direct]:-0}; p=${best[$mode/pgbouncer]:-0}; g=${best[$mode/gatehouse]:-0}
  printf '%-9s %10s %10s %10s %18s %16s\n' "$mode" "${best[$mode/direct]:-failed}" \
    "${best[$mode/pgbouncer]:-failed}" "${best[$mode/gatehouse]:-failed}" \
    "$(awk -v a="$g" -v b="$p" 'BEGIN { if (b) printf "%.2fx", a/b; else print "-" }')" \
    "$(awk -v a="$g" -v b="$d" 'BEGIN { if (b) printf "%.2fx", a/b; else print "-" }')"
done
if [ -n "${BASELINE:-}" ]; then
  for mode in $modes; do
    echo "$mode: gatehouse/baseline $(awk -v a="${best[$mode/gatehouse]:-0}" -v b="${best[$mode/baseline]:-0}" 'BEGIN { if (b) printf "%.2fx", a/b; else print "-" }')"
  done
fi
