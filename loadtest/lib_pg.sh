# Shared by the PostgreSQL benchmarks (bench_db.sh, bench_router.sh): tools,
# the server binaries, a free port, and one pgbench -S measurement with the
# pooler's CPU time per transaction. Source it after `cd` to the repository
# root; it sets $BIN and $GATEHOUSE. `measure` writes $dir/pgbench.out and runs
# for $duration seconds.

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v pgbouncer >/dev/null || missing+=(pgbouncer)
command -v pgbench >/dev/null || missing+=(postgresql-contrib)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
cargo build --release --locked -q
GATEHOUSE=$PWD/target/release/gatehouse
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# CPU ticks (user + system, all threads) a process has used.
ticks() { [ -n "$1" ] && awk '{ print $14 + $15 }' "/proc/$1/stat" || echo 0; }

# measure HOST PORT MODE [POOLER_PID]: pgbench -S -c 50 -j 2 (MODE simple,
# extended or prepared; or `literals`, below) →
# "tps latency_ms pooler_cpu_us_per_transaction", or "failed - -" when a
# transaction failed. The pooler's CPU per transaction is steadier than tps
# on a shared machine.
measure() {
  local before after load=(-S -M "$3")
  if [ "$3" = literals ]; then
    # pgbench -S's statement with its parameter written into the text, as
    # psycopg's client-side binding (Django's default) sends every query,
    # and with a `(` that makes it worth a session-state look.
    printf '%s\n' '\set aid random(1, 1000000)' \
      'SELECT abalance FROM pgbench_accounts WHERE aid IN (:aid);' > "$dir/literals.sql"
    load=(-M simple -f "$dir/literals.sql")
  fi
  before=$(ticks "$4")
  "$BIN/pgbench" -h "$1" -p "$2" -U postgres -n "${load[@]}" -c 50 -j 2 -T "$duration" bench > "$dir/pgbench.out" 2>&1 || true
  after=$(ticks "$4")
  awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" -v pooled="${4:+1}" '
    /^latency average/ { lat=$4 } /^tps = / { tps=$3 }
    /actually processed/ { tx=$NF }
    /failed transactions: [1-9]/ || /aborted/ { failed=1 }
    END {
      if (failed || tps == "") { print "failed", "-", "-"; exit }
      cpu = (pooled && tx) ? sprintf("%.2f", ticks / hz * 1e6 / tx) : "-"
      printf "%.0f %s %s\n", tps, lat, cpu
    }' "$dir/pgbench.out"
}

# start_pgbouncer PORT POOL: PgBouncer in transaction mode in front of the
# bench database on $dir:$PG, listening on $dir/pgb/.s.PGSQL.PORT, trusting
# local clients; its pid in $pgb_pid.
start_pgbouncer() {
  mkdir -p "$dir/pgb"
  cat > "$dir/pgb/pgbouncer.ini" <<CONF
[databases]
bench = host=$dir port=$PG dbname=bench user=postgres
[pgbouncer]
listen_addr =
listen_port = $1
unix_socket_dir = $dir/pgb
auth_type = trust
auth_file = $dir/pgb/users.txt
pool_mode = transaction
default_pool_size = $2
max_client_conn = 1000
logfile = $dir/pgb/pgbouncer.log
pidfile = $dir/pgb/pgbouncer.pid
CONF
  echo '"postgres" ""' > "$dir/pgb/users.txt"
  if [ "$(id -u)" = 0 ]; then chown -R postgres "$dir/pgb"; fi
  "${owner[@]}" pgbouncer -d "$dir/pgb/pgbouncer.ini"
  for _ in $(seq 50); do [ -f "$dir/pgb/pgbouncer.pid" ] && break; sleep 0.1; done
  pgb_pid=$(cat "$dir/pgb/pgbouncer.pid")
}
