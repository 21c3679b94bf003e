#!/usr/bin/env bash
# Installs (Debian) and starts the peers of the comparison bench on loopback, apart from
# any system instances: Redis on 6390 (no persistence) and PostgreSQL on 5440 (a cluster of
# its own in $COMPARE_PG_DIR, trust auth on 127.0.0.1). Idempotent: a peer already answering
# is left as it is. Prints the URLs the bench reads.
#
#   bash compare/setup-peers.sh          # install if missing, start
#   bash compare/setup-peers.sh stop     # stop both
set -euo pipefail

REDIS_PORT="${COMPARE_REDIS_PORT:-6390}"
PG_PORT="${COMPARE_PG_PORT:-5440}"
PG_DIR="${COMPARE_PG_DIR:-/tmp/leasehold-compare-pg}"
REDIS_DIR="${COMPARE_REDIS_DIR:-/tmp/leasehold-compare-redis}"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

pg_bin() {
    # The newest installed server's binaries (Debian keeps them out of PATH).
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
    [ -n "$dir" ] && echo "$dir/$1"
}

# Runs a command as the unprivileged postgres user (PostgreSQL refuses to run as root).
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

if [ "${1:-}" = "stop" ]; then
    redis-cli -p "$REDIS_PORT" shutdown nosave 2>/dev/null || true
    if [ -f "$PG_DIR/data/postmaster.pid" ]; then
        as_pg "$(pg_bin pg_ctl)" -D "$PG_DIR/data" -m fast stop || true
    fi
    exit 0
fi

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x "$(pg_bin initdb || true)" ] || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # Where the packages start system instances (default ports), ours stay apart from them.
fi

# Redis: no snapshots, no append-only file.
if redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
    echo "redis: already running on $REDIS_PORT" >&2
else
    mkdir -p "$REDIS_DIR"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$REDIS_DIR" --daemonize yes --logfile "$REDIS_DIR/redis.log" \
        --pidfile "$REDIS_DIR/redis.pid"
    for _ in $(seq 50); do
        redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break
        sleep 0.1
    done
fi

# PostgreSQL: a cluster of its own, owned by postgres, trust auth on loopback only.
if as_pg "$(pg_bin pg_isready)" -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; then
    echo "postgresql: already running on $PG_PORT" >&2
else
    mkdir -p "$PG_DIR"
    chown postgres: "$PG_DIR" 2>/dev/null || as_root chown postgres: "$PG_DIR"
    if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
        as_pg "$(pg_bin initdb)" -D "$PG_DIR/data" -U postgres --auth=trust \
            --no-instructions >/dev/null
    fi
    # Durability settings do not matter to advisory locks (they write nothing); the socket
    # directory is ours so that no system instance's lock file is in the way.
    as_pg "$(pg_bin pg_ctl)" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w \
        -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$PG_DIR -c max_connections=200" \
        start >/dev/null
fi

echo "export COMPARE_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/"
echo "export COMPARE_PG_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres"
