#!/usr/bin/env bash
# Gatehouse vs nginx as a reverse proxy, in one run, on this machine.
#
# Starts a fast upstream (nginx serving fixed bodies), two nginx proxies
# (proxy_pass, keep-alive upstream, `worker_processes auto`, its recommended
# setting: one per core) and gatehouse (same upstream, its default worker count:
# one per core as well), then drives each with wrk: 64 connections,
# a small (2 KiB) and a large (64 KiB) response. The two nginx differ in what
# they send Gunicorn: `nginx` sends the fields gatehouse sends (Host as the
# client wrote it, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host,
# X-Request-ID), so both do the same work; `nginx-min` sends only Host and
# X-Forwarded-For. Gatehouse is the production build, scripts/release-build.sh
# (BUILD=plain measures `cargo build --release` instead). Each round runs
# `direct`, then the proxies in an order that turns by one each round, so
# each goes first as often as the others and drift on a shared machine hits
# all. Prints req/s, p50, p99 and the gatehouse/nginx ratios: best against
# best, and each round's with their median. Access logs are off for all, or
# with ACCESS_LOG=on written by each to a file in the scratch directory
# (nginx's default buffered-less `access_log FILE`, gatehouse's
# `log.access_log_path`).
#
# Usage: [ACCESS_LOG=on] [BUILD=plain] loadtest/bench_proxy.sh [seconds-per-run=10] [rounds=3]
# (a multiple of three rounds gives each proxy the first place equally often)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
rounds=${2:-3}
nginx_workers=${NGINX_WORKERS:-auto}
gatehouse_workers=${GATEHOUSE_WORKERS:-0}
access_log=${ACCESS_LOG:-off}

BUILD=${BUILD:-pgo}
. loadtest/lib.sh

if [ "$access_log" = on ]; then
  nginx_log="access_log $dir/nginx-access.log;"
  nginx_min_log="access_log $dir/nginx-min-access.log;"
  gatehouse_log=(GATEHOUSE_LOG__ACCESS_LOG=true GATEHOUSE_LOG__ACCESS_LOG_PATH="$dir/gatehouse-access.log")
else
  nginx_log="access_log off;"
  nginx_min_log="access_log off;"
  gatehouse_log=(GATEHOUSE_LOG__ACCESS_LOG=false)
fi

UP=$(free_port); NG=$(free_port); NM=$(free_port); GH=$(free_port)
start_upstream "$UP"
# nginx_proxy NAME PORT LOG FIELDS: one nginx proxy in front of the upstream.
nginx_proxy() {
  cat > "$dir/$1.conf" <<CONF
worker_processes $nginx_workers; pid $dir/$1.pid; $NGINX_COMMON
http { $3 keepalive_requests 100000;
  upstream app { server 127.0.0.1:$UP; keepalive 64; }
  server { listen 127.0.0.1:$2;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; $4 } } }
CONF
  "$NGINX" -c "$dir/$1.conf" -p "$dir"
}
nginx_proxy nginx "$NG" "$nginx_log" 'proxy_set_header Host $http_host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $http_host; proxy_set_header X-Request-ID $request_id;'
nginx_proxy nginx-min "$NM" "$nginx_min_log" 'proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;'
start_gatehouse gatehouse "$GH" "$UP" GATEHOUSE_SERVER__WORKERS="$gatehouse_workers" GATEHOUSE_RATELIMIT__ENABLED=false \
  GATEHOUSE_CACHE__ENABLED=false \
  "${gatehouse_log[@]}"
curl -sf "http://127.0.0.1:$NG/small" >/dev/null
curl -sf "http://127.0.0.1:$NM/small" >/dev/null

printf '%-8s %-10s %5s %10s %9s %9s\n' size target round req/s p50_ms p99_ms
declare -A best_rps best_p99 round_rps
for size in small large; do
  curl -s "http://127.0.0.1:$UP/$size" >/dev/null
  for round in $(seq "$rounds"); do
    # The proxies take turns going first: which one did moved their ratio
    # by up to a tenth on a 2-core machine (docs/benchmarks.md).
    proxies=(nginx nginx-min gatehouse)
    shift_by=$(((round - 1) % 3))
    order="${proxies[*]:shift_by} ${proxies[*]:0:shift_by}"
    for target in direct $order; do
      case $target in direct) port=$UP;; nginx) port=$NG;; nginx-min) port=$NM;; gatehouse) port=$GH;; esac
      read -r rps p50 p99 < <(measure "http://127.0.0.1:$port/$size" "$duration")
      printf '%-8s %-10s %5s %10s %9s %9s\n' "$size" "$target" "$round" "$rps" "$p50" "$p99"
      key="$size/$target"
      round_rps[$key/$round]=$rps
      if [ -z "${best_rps[$key]:-}" ] || [ "$rps" -gt "${best_rps[$key]}" ]; then
        best_rps[$key]=$rps; best_p99[$key]=$p99
      fi
    done
  done
done

echo
echo "best of $rounds rounds, ${duration}s each, 64 connections, $(nproc) cores;" \
  "nginx worker_processes=$nginx_workers, gatehouse workers=$gatehouse_workers (0 = 1 per core)," \
  "build ${BUILD};" "access logs $access_log"
if [ "$access_log" = on ]; then
  echo "access-log lines: nginx $(wc -l < "$dir/nginx-access.log"), nginx-min $(wc -l < "$dir/nginx-min-access.log")," \
    "gatehouse $(wc -l < "$dir/gatehouse-access.log")"
fi
printf '%-8s %-10s %10s %10s %10s %12s %18s %s\n' size peer direct peer gatehouse "gatehouse/peer" "p99 gh-peer (ms)" \
  "  round by round (median)"
for size in small large; do
  for peer in nginx nginx-min; do
    d=${best_rps[$size/direct]}; n=${best_rps[$size/$peer]}; g=${best_rps[$size/gatehouse]}
    ratio=$(awk -v g="$g" -v n="$n" 'BEGIN { printf "%.2f", g/n }')
    dp99=$(awk -v g="${best_p99[$size/gatehouse]}" -v n="${best_p99[$size/$peer]}" 'BEGIN { printf "%+.3f", g-n }')
    # Each round measures the proxies back to back, so a round's ratio
    # sees the same machine; its median is steadier than best against best.
    rounds_ratio=$(for round in $(seq "$rounds"); do
      echo "${round_rps[$size/gatehouse/$round]} ${round_rps[$size/$peer/$round]}"
    done | awk '{ printf "%.2f\n", $1 / $2 }' | sort -n | awk '{ r[NR] = $1; printf "%s ", $1 }
      END { printf "(%.2fx)", NR % 2 ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2 }')
    printf '%-8s %-10s %10s %10s %10s %12s %18s   %s\n' "$size" "$peer" "$d" "$n" "$g" "${ratio}x" "$dp99" "$rounds_ratio"
  done
done
