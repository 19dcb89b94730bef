#!/usr/bin/env bash
# Installs, starts and prepares PostgreSQL for the buffer tests (src/buffer/postgres.rs).
# Run as root on a fresh Debian machine before `cargo test`; safe to run again (idempotent).
# It exports nothing: the tests read GROVE_TEST_POSTGRES_URL and default to
#   postgres://postgres@localhost:5432/grove_test
# Local TCP connections are trusted (no password): acceptable on a throwaway CI machine only.
set -euo pipefail

DB=grove_test
PORT=5432
MARKER="# grove-ci: trust local TCP"

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v pg_ctlcluster >/dev/null; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
fi

VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)

# The package creates the "main" cluster; create it if this machine was set up without one.
if ! pg_lsclusters -h | awk '{print $1 "/" $2}' | grep -qx "$VERSION/main"; then
  pg_createcluster --port "$PORT" "$VERSION" main
fi

# pg_hba.conf is read top-down and the first match wins, so the trust lines go first.
HBA=/etc/postgresql/$VERSION/main/pg_hba.conf
if ! grep -qF "$MARKER" "$HBA"; then
  {
    echo "$MARKER"
    echo "host all all 127.0.0.1/32 trust"
    echo "host all all ::1/128 trust"
    cat "$HBA"
  } >"$HBA.grove" && mv "$HBA.grove" "$HBA"
  chown postgres:postgres "$HBA"
fi

# Start it, or make a running one re-read pg_hba.conf.
if pg_lsclusters -h | awk -v c="$VERSION/main" '$1 "/" $2 == c {print $4}' | grep -qx online; then
  pg_ctlcluster "$VERSION" main reload
else
  pg_ctlcluster "$VERSION" main start
fi

for _ in $(seq 1 30); do
  pg_isready -h localhost -p "$PORT" -q && break
  sleep 1
done
pg_isready -h localhost -p "$PORT"

if ! runuser -u postgres -- psql -p "$PORT" -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -qx 1; then
  runuser -u postgres -- createdb -p "$PORT" "$DB"
fi
echo "PostgreSQL $VERSION ready: postgres://postgres@localhost:$PORT/$DB"
