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

# measure HOST PORT MODE [POOLER_PID]: pgbench -S -c 50 -j 2 →
# "tps latency_ms pooler_cpu_us_per_transaction", or "failed - -" when a
# transaction failed. The pooler's CPU per transaction is steadier than tps
# on a shared machine.
measure() {
  local before after
  before=$(ticks "$4")
  "$BIN/pgbench" -h "$1" -p "$2" -U postgres -n -S -c 50 -j 2 -T "$duration" -M "$3" bench > "$dir/pgbench.out" 2>&1 || true
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
