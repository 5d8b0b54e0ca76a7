#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests
# need (curl, redis-server, PostgreSQL, libclang, Prometheus, docker-compose,
# a Python venv with Django, Gunicorn and locust), then runs formatting,
# lints and every test against real servers. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v curl >/dev/null || missing+=(curl)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v psql >/dev/null || missing+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v cc >/dev/null || missing+=(build-essential)
# pg_query (PostgreSQL's grammar, for the statement classifier) builds with bindgen.
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
command -v python3 >/dev/null || missing+=(python3)
# The systemd units are checked with systemd-analyze verify, the alert rules
# with promtool, the dashboards against a real Prometheus, the compose file
# with docker-compose config (no engine needed).
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install a Rust toolchain >= 1.85 (rustup, or Debian's rustc/cargo if new enough)" >&2
  exit 1
fi

# The example Django app runs under real Gunicorn in the tests, and locust
# drives it (loadtest/run.sh's smoke run).
venv=${GATEHOUSE_VENV:-.venv}
requirements=(examples/django/requirements.txt loadtest/requirements.txt)
if [ ! -x "$venv/bin/gunicorn" ] || [ ! -x "$venv/bin/locust" ] \
  || ! cat "${requirements[@]}" | cmp -s - "$venv/.requirements"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${requirements[@]/#/-r}"
  cat "${requirements[@]}" > "$venv/.requirements"
fi
export GATEHOUSE_VENV="$(cd "$venv" && pwd)"

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo build --locked --release
./target/release/gatehouse check-config config/*.toml docker/config/*.toml
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, also when a test failed.
awk '/^test result:/ { p += $4; f += $6 } END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
