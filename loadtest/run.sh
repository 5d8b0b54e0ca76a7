#!/usr/bin/env bash
# Runs loadtest/locustfile.py headless against a running stack (the compose
# file in docker/, the systemd units in deploy/systemd/, or any gateway in
# front of the example app) and writes locust's CSV and HTML reports.
#
#   loadtest/run.sh                                   # http://localhost, 50 users, 1 minute
#   loadtest/run.sh --host http://127.0.0.1:8080 --users 200 --run-time 5m
#   loadtest/run.sh --out /tmp/run1 -- --processes 2  # anything after -- goes to locust
#
# The reports land in --out (default loadtest/results/<UTC time>/): stats.csv,
# stats_history.csv, failures.csv, exceptions.csv and report.html. The exit
# status is locust's: 1 when any request failed (a 429 counts as a failure).
set -euo pipefail
cd "$(dirname "$0")/.."

host=${LOCUST_HOST:-http://localhost}
users=50
spawn_rate=10
run_time=1m
out=""
extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --host) host=$2; shift 2 ;;
    --users) users=$2; shift 2 ;;
    --spawn-rate) spawn_rate=$2; shift 2 ;;
    --run-time) run_time=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "run.sh: unknown argument $1 (see the top of loadtest/run.sh)" >&2; exit 2 ;;
  esac
done
out=${out:-loadtest/results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"

# locust from the tests' venv, else one of its own under loadtest/.venv.
venv=${GATEHOUSE_VENV:-.venv}
if [ ! -x "$venv/bin/locust" ]; then
  venv=loadtest/.venv
  if [ ! -x "$venv/bin/locust" ] || ! cmp -s loadtest/requirements.txt "$venv/.requirements"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r loadtest/requirements.txt
    cp loadtest/requirements.txt "$venv/.requirements"
  fi
fi

set +e
"$venv/bin/locust" -f loadtest/locustfile.py --headless --host "$host" \
  --users "$users" --spawn-rate "$spawn_rate" --run-time "$run_time" \
  --csv "$out/stats" --csv-full-history --html "$out/report.html" \
  --only-summary "${extra[@]}"
status=$?
set -e

# One line to compare runs by: successful answers only.
python3 - "$out/stats_stats.csv" <<'PY'
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    if row["Name"] == "Aggregated":
        ok = int(row["Request Count"]) - int(row["Failure Count"])
        print(f"aggregated: {ok} successful, {row['Failure Count']} failed, "
              f"{float(row['Requests/s']) - float(row['Failures/s']):.1f} successful req/s, "
              f"p50 {row['50%']} ms, p95 {row['95%']} ms, p99 {row['99%']} ms")
PY
echo "reports: $out/stats_*.csv, $out/report.html"
exit "$status"
