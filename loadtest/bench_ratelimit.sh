#!/usr/bin/env bash
# Cost of rate limiting, in one run: gatehouse with limits off, with limits
# counted in Redis (one Lua call per request), and with limits counted in the
# process, in front of the same fast upstream, driven by wrk (64 connections,
# 2 KiB responses). Limits are set so high that every request is checked and
# counted but none is refused. Then Redis memory per 100,000 active subjects.
#
# Usage: loadtest/bench_ratelimit.sh [seconds-per-run=10] [rounds=3]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
rounds=${2:-3}

. loadtest/lib.sh
need_packages redis-server:redis-server redis-cli:redis-tools

UP=$(free_port); REDIS=$(free_port)
start_upstream "$UP"
redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$dir/redis.pid" --dir "$dir" --logfile "$dir/redis.log"
for _ in $(seq 50); do redis-cli -p "$REDIS" ping >/dev/null 2>&1 && break; sleep 0.1; done

huge=(GATEHOUSE_RATELIMIT__PER_USER=1000000000 GATEHOUSE_RATELIMIT__GLOBAL=1000000000)
OFF=$(free_port); SHARED=$(free_port); LOCAL=$(free_port)
start_gatehouse off "$OFF" "$UP" GATEHOUSE_RATELIMIT__ENABLED=false
start_gatehouse redis "$SHARED" "$UP" "${huge[@]}" GATEHOUSE_REDIS__URL="redis://127.0.0.1:$REDIS/0"
start_gatehouse local "$LOCAL" "$UP" "${huge[@]}"
curl -sf -D - -o /dev/null "http://127.0.0.1:$SHARED/small" | grep -qi '^ratelimit:' \
  || { echo "limits are not active on the redis instance" >&2; exit 1; }

printf '%-8s %5s %10s %9s %9s\n' limits round req/s p50_ms p99_ms
declare -A best_rps best_p99
for round in $(seq "$rounds"); do
  for target in off redis local; do
    case $target in off) port=$OFF;; redis) port=$SHARED;; local) port=$LOCAL;; esac
    read -r rps p50 p99 < <(measure "http://127.0.0.1:$port/small" "$duration")
    printf '%-8s %5s %10s %9s %9s\n' "$target" "$round" "$rps" "$p50" "$p99"
    if [ -z "${best_rps[$target]:-}" ] || [ "$rps" -gt "${best_rps[$target]}" ]; then
      best_rps[$target]=$rps; best_p99[$target]=$p99
    fi
  done
done
echo
echo "best of $rounds rounds, ${duration}s each, 64 connections, $(nproc) cores"
printf '%-8s %10s %10s %20s\n' limits req/s "vs off" "p99 added (ms)"
for target in off redis local; do
  ratio=$(awk -v a="${best_rps[$target]}" -v b="${best_rps[off]}" 'BEGIN { printf "%.2fx", a/b }')
  added=$(awk -v a="${best_p99[$target]}" -v b="${best_p99[off]}" 'BEGIN { printf "%+.3f", a-b }')
  printf '%-8s %10s %10s %20s\n' "$target" "${best_rps[$target]}" "$ratio" "$added"
done

# Memory: many distinct callers, each a new per-user key in Redis.
MEM=$(free_port)
start_gatehouse memory "$MEM" "$UP" "${huge[@]}" GATEHOUSE_REDIS__URL="redis://127.0.0.1:$REDIS/1" \
  GATEHOUSE_SERVER__TRUSTED_PROXIES='["127.0.0.1/32"]'
redis-cli -p "$REDIS" -n 1 flushdb >/dev/null
before=$(redis-cli -p "$REDIS" info memory | awk -F: '/^used_memory:/ { print $2+0 }')
wrk -t2 -c64 -d8s -s loadtest/random_client.lua "http://127.0.0.1:$MEM/small" >/dev/null
after=$(redis-cli -p "$REDIS" info memory | awk -F: '/^used_memory:/ { print $2+0 }')
keys=$(redis-cli -p "$REDIS" -n 1 dbsize)
subjects=$((keys - 1))  # one key is the global rule's
echo
echo "redis memory: $subjects subjects, $((after - before)) bytes," \
  "$(awk -v d=$((after - before)) -v n="$subjects" 'BEGIN { printf "%.1f MiB per 100,000 subjects (%.0f bytes each)", d/n*100000/1048576, d/n }')"
