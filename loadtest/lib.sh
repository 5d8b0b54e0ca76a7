# Shared by the loadtest scripts: tools, a scratch directory cleaned on exit,
# a fast nginx upstream, starting gatehouse, and one wrk measurement.
# Source it after `cd` to the repository root; it sets $dir, $NGINX, $GATEHOUSE.

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# need_packages COMMAND:PACKAGE ...
need_packages() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
}

need_packages nginx:nginx-light wrk:wrk
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
# BUILD picks the gatehouse measured: `plain` (the default) is `cargo build
# --release`, `pgo` is scripts/release-build.sh's profile-guided build, and
# `none` keeps the GATEHOUSE the caller set.
case ${BUILD:-plain} in
  plain) cargo build --release --locked -q; GATEHOUSE=$PWD/target/release/gatehouse ;;
  pgo) scripts/release-build.sh >&2; GATEHOUSE=$PWD/target/pgo/release/gatehouse ;;
  none) ;;
  *) echo "BUILD is plain, pgo or none, not '$BUILD'" >&2; exit 2 ;;
esac

dir=$(mktemp -d)
chmod 755 "$dir"  # nginx workers run as www-data
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pidfile in "$dir"/*.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

NGINX_COMMON="daemon on; error_log $dir/error.log warn; events { worker_connections 4096; }"

# start_upstream PORT: nginx serving /small (2 KiB) and /large (64 KiB).
start_upstream() {
  mkdir -p "$dir/www"
  head -c 2048 /dev/zero | tr '\0' 'a' > "$dir/www/small"
  head -c 65536 /dev/zero | tr '\0' 'b' > "$dir/www/large"
  cat > "$dir/upstream.conf" <<CONF
worker_processes 1; pid $dir/up.pid; $NGINX_COMMON
http { access_log off; keepalive_requests 100000;
  server { listen 127.0.0.1:$1; root $dir/www; location / { default_type text/plain; } } }
CONF
  "$NGINX" -c "$dir/upstream.conf" -p "$dir"
}

# start_gatehouse NAME PORT UPSTREAM_PORT [ENV=VALUE ...]: access log off,
# health checks on /small; waits until it answers. It runs in a session of
# its own (setsid), as nginx's daemon and a systemd service do: in the shell's
# session it would share one scheduling group (autogroup) with wrk.
start_gatehouse() {
  local name=$1 port=$2 upstream=$3
  shift 3
  env GATEHOUSE_LOG__ACCESS_LOG=false GATEHOUSE_LOG__LEVEL=warn \
    GATEHOUSE_UPSTREAM__HEALTH_CHECK__PATH=/small "$@" \
    setsid "$GATEHOUSE" proxy --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$(free_port)" \
    --upstream "http://127.0.0.1:$upstream" 2>"$dir/$name.log" &
  pids+=($!)
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/small" >/dev/null && return; sleep 0.1; done
  echo "gatehouse ($name) did not answer:" >&2
  cat "$dir/$name.log" >&2
  exit 1
}

# measure URL SECONDS [wrk args...] → "rps p50_ms p99_ms"
measure() {
  local url=$1 seconds=$2
  shift 2
  # Only successful answers count: a run with any non-2xx answer or socket
  # error stops the script.
  wrk -t2 -c64 -d"${seconds}s" --latency "$@" "$url" | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /^Requests\/sec/ { rps=$2 } / 50%/ { p50=ms($2) } / 99%/ { p99=ms($2) }
    /Non-2xx or 3xx responses/ { bad=$NF } /Socket errors/ { errors=$0 }
    END {
      if (bad > 0) { print "non-2xx answers: " bad > "/dev/stderr"; exit 1 }
      printf "%.0f %.3f %.3f\n", rps, p50, p99
    }'
}
