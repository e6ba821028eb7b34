#!/usr/bin/env bash
# Every check and every test of Vigil, on a fresh machine.
#
# Installs what the tests need (Debian packages, only when missing: postgresql, chromium,
# chromium-driver), starts a throwaway PostgreSQL on loopback, runs `cargo fmt --check`,
# `cargo clippy --all-targets -D warnings` and all tests (SQLite, PostgreSQL, the browser), and
# stops what it started, whatever happens.
#
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -- NAME    # only the tests whose name contains NAME (fmt and clippy still run)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- what the tests need -------------------------------------------------------------------
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- a throwaway PostgreSQL ----------------------------------------------------------------
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PGDIR=$(mktemp -d /tmp/vigil-pg.XXXXXX)
PGPORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# PostgreSQL refuses to run as root: as root, run it as the `postgres` user.
if [ "$(id -u)" -eq 0 ]; then
  chown postgres:postgres "$PGDIR"
  pg() { runuser -u postgres -- "$@"; }
else
  pg() { "$@"; }
fi
stop_postgres() {
  pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$PGDIR"
}
trap stop_postgres EXIT

log "starting PostgreSQL on 127.0.0.1:$PGPORT"
pg "$PGBIN/initdb" -D "$PGDIR/data" -U postgres -A trust -E UTF8 --no-sync >/dev/null
pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w -t 30 \
  -o "-p $PGPORT -k $PGDIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=300" \
  start >/dev/null
export VIGIL_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$PGPORT/postgres"

# --- checks and tests ------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
log "cargo test"
cargo test --locked "$@"
log "all checks passed"
