#!/usr/bin/env bash
# The services the tests run against, from the registries, on loopback: a private PostgreSQL
# cluster (Debian's `postgresql` package) on port 54329 with trust authentication, and an
# S3-compatible server (moto from PyPI) on port 54330.
# Source it: it exports TEST_DATABASE_URL and TEST_S3_ENDPOINT for `cargo test`. Safe to source again: a running
# cluster is reused. Under `set -e` (as .ci/run) a failed step stops the caller.

PG_PORT=${PG_PORT:-54329}
PG_DIR=${PG_DIR:-/tmp/qlorad-test-pg}

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing PostgreSQL (Debian's postgresql package)" >&2
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null ||
      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; }
  else
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
  fi
fi
PG_BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")

# PostgreSQL refuses to run as root: root runs it as the package's `postgres` user.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if ! "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
  if [ ! -f "$PG_DIR/PG_VERSION" ]; then
    mkdir -p "$PG_DIR"
    [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR"
    as_pg "$PG_BIN/initdb" -D "$PG_DIR" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  # Tests make a database each; fsync off is for a throwaway cluster only.
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/log" -w start \
    -o "-p $PG_PORT -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=400" >/dev/null
fi
export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
echo "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT" >&2

# An S3-compatible server: moto in server mode, from PyPI, in its own virtual environment.
S3_PORT=${S3_PORT:-54330}
MOTO_VENV=${MOTO_VENV:-/tmp/qlorad-test-moto}
if ! curl -sf "http://127.0.0.1:$S3_PORT/moto-api/" >/dev/null 2>&1; then
  if [ ! -x "$MOTO_VENV/bin/moto_server" ]; then
    echo "installing moto[server] (PyPI)" >&2
    python3 -m venv "$MOTO_VENV"
    "$MOTO_VENV/bin/pip" install -q "moto[server]==5.2.*" >&2
  fi
  nohup "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$MOTO_VENV/server.log" 2>&1 &
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$S3_PORT/moto-api/" >/dev/null 2>&1 && break
    sleep 0.1
  done
fi
export TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
echo "moto $("$MOTO_VENV/bin/pip" show moto 2>/dev/null | awk '/^Version/{print $2}') (S3) on 127.0.0.1:$S3_PORT" >&2
