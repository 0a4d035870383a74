#!/usr/bin/env bash
# Postgres primary, first start only: the role the streaming replica connects as, and the
# pg_hba.conf line that lets it. Run by the official postgres image's entrypoint from
# /docker-entrypoint-initdb.d/ (as the postgres user, with the server up on its local socket),
# after initdb and before the real start, so the new pg_hba.conf line is read by that start.
# Needs POSTGRES_USER, POSTGRES_DB, REPLICATION_USER and REPLICATION_PASSWORD.
set -euo pipefail

: "${REPLICATION_USER:?REPLICATION_USER is not set}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=role="$REPLICATION_USER" --set=password="$REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE :"role" WITH REPLICATION LOGIN PASSWORD :'password';
SQL

# `all` in the database column does not cover replication connections: they need their own line.
echo "host replication ${REPLICATION_USER} all scram-sha-256" >>"$PGDATA/pg_hba.conf"
echo "primary-init: replication role ${REPLICATION_USER} created"
