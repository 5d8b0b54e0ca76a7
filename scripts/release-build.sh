#!/usr/bin/env bash
# The production build: a release build optimised with a profile of the
# gateway's own hot path (profile-guided optimisation, as rustc, Clang and
# Chromium ship). It builds an instrumented binary, runs it behind wrk against
# an nginx that serves fixed bodies (small and large answers; limits and cache
# off, then the access log on, then the embedded defaults), merges what it
# counted, and builds again with that profile. docs/benchmarks.md has what it
# gains over a plain `cargo build --release`.
#
# Output: target/pgo/release/gatehouse (the plain build's target/release is
# left alone). Needs llvm-profdata of the LLVM major version rustc was built
# with: Debian's llvm-N, which this script installs when it runs as root, or
# rustup's llvm-tools component. A second run with no change to the sources
# reuses the profile and the build.
#
# Usage: scripts/release-build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

llvm=$(rustc -vV | awk '/^LLVM version:/ { split($3, v, "."); print v[1] }')
find_profdata() {
  local tool
  for tool in "llvm-profdata-$llvm" "$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | awk '/^host:/ { print $2 }')/bin/llvm-profdata"; do
    if command -v "$tool" >/dev/null; then
      echo "$tool"
      return
    fi
  done
  # Another version's tool reads only the formats it knows: take the
  # unversioned one only when it is the same major version.
  if llvm-profdata --version 2>/dev/null | grep -q "LLVM version $llvm\."; then
    echo llvm-profdata
  fi
}
profdata=$(find_profdata)
if [ -z "$profdata" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$llvm" >/dev/null
  profdata=$(find_profdata)
fi
if [ -z "$profdata" ]; then
  echo "release-build: rustc uses LLVM $llvm, and no llvm-profdata of that version was found;" \
    "install Debian's llvm-$llvm or run \`rustup component add llvm-tools\`" >&2
  exit 1
fi

# 1. The instrumented build. Build scripts run instrumented too and leave
#    their own counts behind: those are cleared before the training.
gen=$root/target/pgo-generate
RUSTFLAGS="-Cprofile-generate=$gen/profiles" CARGO_TARGET_DIR=$gen cargo build --release --locked -q
instrumented=$gen/release/gatehouse
stamp=$(sha256sum "$instrumented" | cut -c1-16)

# 2. The training, skipped when this instrumented binary was trained before.
if [ ! -f "$gen/trained-$stamp.profdata" ]; then
  rm -rf "$gen/profiles" "$gen"/trained-*.profdata
  (
    BUILD=none GATEHOUSE=$instrumented
    . loadtest/lib.sh
    UP=$(free_port)
    start_upstream "$UP"
    # train NAME SECONDS [ENV=VALUE ...]: small and large answers through one
    # gatehouse, stopped with SIGTERM so it writes its counts as it exits.
    train() {
      local name=$1 seconds=$2 port
      shift 2
      port=$(free_port)
      start_gatehouse "$name" "$port" "$UP" "$@"
      wrk -t2 -c64 -d"${seconds}s" "http://127.0.0.1:$port/small" >/dev/null
      wrk -t2 -c64 -d"$((seconds / 2))s" "http://127.0.0.1:$port/large" >/dev/null
      kill -TERM "${pids[-1]}"
      wait "${pids[-1]}" || true
    }
    train plain 8 GATEHOUSE_RATELIMIT__ENABLED=false GATEHOUSE_CACHE__ENABLED=false
    train logged 6 GATEHOUSE_RATELIMIT__ENABLED=false GATEHOUSE_CACHE__ENABLED=false \
      GATEHOUSE_LOG__ACCESS_LOG=true GATEHOUSE_LOG__ACCESS_LOG_PATH="$dir/access.log"
    train defaults 4
  )
  "$profdata" merge -o "$gen/trained-$stamp.profdata" "$gen"/profiles/*.profraw
fi

# 3. The optimised build. The profile's name carries its binary's hash, so a
#    new profile rebuilds everything and an unchanged one nothing.
RUSTFLAGS="-Cprofile-use=$gen/trained-$stamp.profdata" CARGO_TARGET_DIR=$root/target/pgo \
  cargo build --release --locked -q
echo "release-build: target/pgo/release/gatehouse (profile-guided, LLVM $llvm)"
