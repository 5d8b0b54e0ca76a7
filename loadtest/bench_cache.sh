#!/usr/bin/env bash
# Cache hits: gatehouse vs nginx `proxy_cache`, in one run, on this machine.
#
# A fast upstream (nginx serving fixed bodies) behind nginx with proxy_cache
# (`proxy_cache_valid 200 10m`, its cache directory in the scratch
# directory; once with nginx's default `sendfile off` and once with
# `sendfile on`, as Debian's packaged nginx.conf sets it) and behind gatehouse with its cache on (L1, the embedded
# defaults; and a second gatehouse with L1 off and L2 in a Redis started
# here, to show the cost of a hit from Redis). Both caches are warmed and
# checked to answer hits before measuring; rounds alternate between the
# targets, and each run also reports the CPU the server spent per answer.
# Gatehouse runs its defaults: an L1 entry is fetched again after
# l1_ttl (60 s), nginx's after proxy_cache_valid (10 m): a handful of misses
# in a run of hundreds of thousands of hits. Then gatehouse's memory for 10,000 L1 entries of 2 KiB.
# Prints req/s, p50, p99 and the gatehouse/nginx ratios.
#
# Usage: loadtest/bench_cache.sh [seconds-per-run=10] [rounds=3]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
rounds=${2:-3}

. loadtest/lib.sh
need_packages redis-server:redis-server

UP=$(free_port); NG=$(free_port); NS=$(free_port); GH=$(free_port); G2=$(free_port); RP=$(free_port); MEM=$(free_port)
start_upstream "$UP"
cat > "$dir/cache.conf" <<CONF
worker_processes auto; pid $dir/nc.pid; $NGINX_COMMON
http { access_log off; keepalive_requests 100000;
  proxy_cache_path $dir/nginx-cache levels=1:2 keys_zone=app:10m max_size=1g inactive=10m use_temp_path=off;
  upstream app { server 127.0.0.1:$UP; keepalive 64; }
  server { listen 127.0.0.1:$NG;
    location / { proxy_cache app; proxy_cache_valid 200 10m; proxy_pass http://app;
                 proxy_http_version 1.1; proxy_set_header Connection "";
                 add_header X-Cache-Status \$upstream_cache_status; } } }
CONF
"$NGINX" -c "$dir/cache.conf" -p "$dir"
sed -e "s/listen 127.0.0.1:$NG;/listen 127.0.0.1:$NS;/" -e "s|/nc.pid|/ns.pid|" \
  -e "s|nginx-cache |nginx-cache-sendfile |" -e "s/keys_zone=app:/keys_zone=appsf:/" \
  -e "s/proxy_cache app;/proxy_cache appsf;/" -e "s/keepalive_requests 100000;/keepalive_requests 100000; sendfile on;/" \
  "$dir/cache.conf" > "$dir/cache-sendfile.conf"
grep -q 'sendfile on;' "$dir/cache-sendfile.conf" && grep -q "listen 127.0.0.1:$NS;" "$dir/cache-sendfile.conf"
"$NGINX" -c "$dir/cache-sendfile.conf" -p "$dir"
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$dir/redis.pid" --dir "$dir" >/dev/null
start_gatehouse gatehouse "$GH" "$UP" GATEHOUSE_RATELIMIT__ENABLED=false
start_gatehouse gatehouse-l2 "$G2" "$UP" GATEHOUSE_RATELIMIT__ENABLED=false \
  GATEHOUSE_REDIS__URL="redis://127.0.0.1:$RP" GATEHOUSE_CACHE__L1_MAX_ENTRIES=0

# Warm, and refuse to measure anything but hits.
for size in small large; do
  for _ in 1 2 3; do
    curl -s -o /dev/null "http://127.0.0.1:$NG/$size"
    curl -s -o /dev/null "http://127.0.0.1:$NS/$size"
    curl -s -o /dev/null "http://127.0.0.1:$GH/$size"
    curl -s -o /dev/null "http://127.0.0.1:$G2/$size"
  done
  for port in $NG $NS; do
    curl -sI "http://127.0.0.1:$port/$size" | grep -qi '^x-cache-status: HIT' \
      || { echo "nginx on $port does not answer /$size from its cache" >&2; exit 1; }
  done
  for port in $GH $G2; do
    curl -s -D - -o /dev/null "http://127.0.0.1:$port/$size" | grep -qi '^cache-status: gatehouse; hit' \
      || { echo "gatehouse on $port does not answer /$size from its cache" >&2; exit 1; }
  done
done

# CPU the server spent per answer: user + system time of its processes
# (nginx's workers; gatehouse's one process) over the run, from /proc. Less
# noisy than req/s on a shared machine, where wrk takes its share too.
gh_pid=${pids[-2]}; g2_pid=${pids[-1]}
# Workers only: the cache loader exits after its first minute.
nginx_workers() { pgrep -P "$(cat "$dir/$1")" -f 'worker process' | tr '\n' ' '; }
cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$t"; }

printf '%-8s %-14s %5s %10s %9s %9s %12s\n' size target round req/s p50_ms p99_ms cpu_us/req
declare -A best_rps best_p99 best_cpu
targets="nginx nginx-sendfile gatehouse gatehouse-l2"
for size in small large; do
  for round in $(seq "$rounds"); do
    for target in $targets; do
      case $target in
        nginx) port=$NG; procs=$(nginx_workers nc.pid);;
        nginx-sendfile) port=$NS; procs=$(nginx_workers ns.pid);;
        gatehouse) port=$GH; procs=$gh_pid;;
        gatehouse-l2) port=$G2; procs=$g2_pid;;
      esac
      # shellcheck disable=SC2086
      before=$(cpu_ticks $procs)
      read -r rps p50 p99 < <(measure "http://127.0.0.1:$port/$size" "$duration")
      # shellcheck disable=SC2086
      after=$(cpu_ticks $procs)
      cpu=$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v r="$rps" -v d="$duration" \
        'BEGIN { printf "%.2f", t / hz * 1e6 / (r * d) }')
      printf '%-8s %-14s %5s %10s %9s %9s %12s\n' "$size" "$target" "$round" "$rps" "$p50" "$p99" "$cpu"
      key="$size/$target"
      if [ -z "${best_rps[$key]:-}" ] || [ "$rps" -gt "${best_rps[$key]}" ]; then
        best_rps[$key]=$rps; best_p99[$key]=$p99
      fi
      if [ -z "${best_cpu[$key]:-}" ] || awk -v a="$cpu" -v b="${best_cpu[$key]}" 'BEGIN { exit !(a < b) }'; then
        best_cpu[$key]=$cpu
      fi
    done
  done
done
echo
echo "best of $rounds rounds, ${duration}s each, 64 connections, $(nproc) cores; cache hits only;" \
  "nginx worker_processes=auto, gatehouse workers=0 (1 per core)"
printf '%-8s %10s %10s %10s %12s %9s %12s %18s %14s\n' size nginx nginx-sf gatehouse gatehouse-l2 \
  "gh/nginx" "gh/nginx-sf" "p99 gh-nginx (ms)" "l2-only/nginx"
for size in small large; do
  n=${best_rps[$size/nginx]}; f=${best_rps[$size/nginx-sendfile]}
  g=${best_rps[$size/gatehouse]}; l=${best_rps[$size/gatehouse-l2]}
  ratio=$(awk -v g="$g" -v n="$n" 'BEGIN { printf "%.2f", g/n }')
  sfratio=$(awk -v g="$g" -v n="$f" 'BEGIN { printf "%.2f", g/n }')
  l2ratio=$(awk -v g="$l" -v n="$n" 'BEGIN { printf "%.2f", g/n }')
  dp99=$(awk -v g="${best_p99[$size/gatehouse]}" -v n="${best_p99[$size/nginx]}" 'BEGIN { printf "%+.3f", g-n }')
  printf '%-8s %10s %10s %10s %12s %9s %12s %18s %14s\n' "$size" "$n" "$f" "$g" "$l" "${ratio}x" "${sfratio}x" "$dp99" "${l2ratio}x"
done
echo
echo "CPU per answer (lowest of the rounds; user + system, the server's processes only):"
printf '%-8s %12s %12s %12s %14s %16s %19s\n' size nginx nginx-sf gatehouse gatehouse-l2 "nginx/gatehouse" "nginx-sf/gatehouse"
for size in small large; do
  n=${best_cpu[$size/nginx]}; f=${best_cpu[$size/nginx-sendfile]}
  g=${best_cpu[$size/gatehouse]}; l=${best_cpu[$size/gatehouse-l2]}
  printf '%-8s %9s us %9s us %9s us %11s us %15sx %18sx\n' "$size" "$n" "$f" "$g" "$l" \
    "$(awk -v n="$n" -v g="$g" 'BEGIN { printf "%.2f", n/g }')" "$(awk -v n="$f" -v g="$g" 'BEGIN { printf "%.2f", n/g }')"
done

# Memory for 10,000 L1 entries of 2 KiB: resident size before and after.
start_gatehouse memory "$MEM" "$UP" GATEHOUSE_RATELIMIT__ENABLED=false \
  GATEHOUSE_CACHE__L1_MAX_ENTRIES=20000 GATEHOUSE_CACHE__L1_MAX_BYTES=1GiB GATEHOUSE_CACHE__L1_TTL=10m
mem_pid=${pids[-1]}
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$mem_pid/status"; }
fill() {
  python3 - "$MEM" "$1" "$2" <<'PY'
import http.client, sys
port, start, end = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
conn = http.client.HTTPConnection("127.0.0.1", port)
for i in range(start, end):
    conn.request("GET", f"/small?entry={i}")
    response = conn.getresponse()
    response.read()
    assert response.status == 200, response.status
PY
}
fill 0 2000  # allocator and connection pools settle
before=$(rss)
fill 2000 12000
after=$(rss)
# The entries are all there: a sample of them still answers from L1.
hits=0
for i in $(seq 2000 500 11999); do
  curl -s -D - -o /dev/null "http://127.0.0.1:$MEM/small?entry=$i" | grep -qi '^cache-status: gatehouse; hit' && hits=$((hits + 1))
done
echo
echo "L1 memory: $(( (after - before) )) KiB resident for 10,000 more entries of 2 KiB" \
  "($(( (after - before) * 1024 / 10000 )) bytes each, body included); sampled entries still hits: $hits/20"
