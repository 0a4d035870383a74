#!/usr/bin/env bash
# Postgres streaming replica (hot standby) on the official postgres image, run as the postgres
# user. First start: an empty data directory becomes a base backup of the primary
# (pg_basebackup -R writes standby.signal and primary_conninfo; -C -S creates a replication
# slot, so the primary keeps the WAL this replica has not received yet). Every start: exec
# postgres with the arguments given (the container's command), read-only, following the primary.
# Needs PRIMARY_HOST, REPLICATION_USER and REPLICATION_PASSWORD; PRIMARY_PORT (5432),
# REPLICATION_SLOT (replica1) and PGDATA (/var/lib/postgresql/data) are optional.
set -euo pipefail

: "${PRIMARY_HOST:?PRIMARY_HOST is not set}"
: "${REPLICATION_USER:?REPLICATION_USER is not set}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD is not set}"
PRIMARY_PORT="${PRIMARY_PORT:-5432}"
REPLICATION_SLOT="${REPLICATION_SLOT:-replica1}"
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
export PGDATA

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "replica: cloning ${PRIMARY_HOST}:${PRIMARY_PORT} into $PGDATA"
    until pg_isready --quiet --host "$PRIMARY_HOST" --port "$PRIMARY_PORT"; do
        echo "replica: waiting for the primary"
        sleep 1
    done
    mkdir -p "$PGDATA"
    chmod 0700 "$PGDATA"
    # the slot may exist from an earlier clone of this replica (its data volume was removed)
    PGPASSWORD="$REPLICATION_PASSWORD" psql --no-psqlrc --quiet \
        "host=$PRIMARY_HOST port=$PRIMARY_PORT user=$REPLICATION_USER dbname=postgres" \
        -c "SELECT pg_drop_replication_slot('$REPLICATION_SLOT') WHERE EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '$REPLICATION_SLOT' AND NOT active)" \
        >/dev/null
    PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup --pgdata "$PGDATA" \
        --host "$PRIMARY_HOST" --port "$PRIMARY_PORT" --username "$REPLICATION_USER" \
        --no-password --wal-method stream --checkpoint fast \
        --write-recovery-conf --create-slot --slot "$REPLICATION_SLOT"
    echo "replica: base backup done"
fi

exec postgres "$@"
