#!/bin/sh
# A streaming replica of postgres-primary: cloned with pg_basebackup the
# first time (standby.signal and primary_conninfo written by -R), then
# started as the image starts PostgreSQL.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 0700 "$PGDATA"
  until gosu postgres pg_isready -h postgres-primary -U "$POSTGRES_USER" -q; do
    echo "waiting for postgres-primary"
    sleep 1
  done
  gosu postgres env PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup \
    -h postgres-primary -U replicator -D "$PGDATA" -R -X stream -S replica1
fi
exec gosu postgres postgres -c hot_standby=on
