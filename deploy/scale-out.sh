#!/usr/bin/env bash
# Tries scale-out on one machine: a local 3-member etcd cluster and 2 leasehold servers
# over it, sharing their locks. Ctrl-C stops everything; data and logs stay in the work
# directory it prints.
#
#   cargo build --features etcd --bin leasehold-server   # needs protoc (see docs/etcd.md)
#   deploy/scale-out.sh
#
# Environment: LEASEHOLD_SERVER (the server binary; default target/debug/leasehold-server,
# else leasehold-server on PATH), ETCD (default etcd on PATH; Debian: etcd-server),
# SCALE_DIR (work directory; default a new one under /tmp), BASE_PORT (default 7880: the
# servers listen on BASE_PORT+1 and +2, etcd members on 23791-23793 and 23801-23803).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
server=${LEASEHOLD_SERVER:-}
if [ -z "$server" ]; then
    if [ -x "$here/target/debug/leasehold-server" ]; then
        server="$here/target/debug/leasehold-server"
    else
        server=$(command -v leasehold-server || true)
    fi
fi
[ -n "$server" ] && [ -x "$server" ] || {
    echo "no leasehold-server binary: cargo build --features etcd --bin leasehold-server" >&2
    exit 1
}
etcd=${ETCD:-$(command -v etcd || true)}
[ -n "$etcd" ] || { echo "no etcd on PATH (Debian: apt-get install etcd-server)" >&2; exit 1; }
dir=${SCALE_DIR:-$(mktemp -d /tmp/leasehold-scale.XXXXXX)}
base=${BASE_PORT:-7880}
mkdir -p "$dir"

pids=()
stop() {
    trap - INT TERM EXIT
    echo "stopping..." >&2
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "data and logs are in $dir" >&2
}
trap stop INT TERM EXIT

cluster="m1=http://127.0.0.1:23801,m2=http://127.0.0.1:23802,m3=http://127.0.0.1:23803"
endpoints="http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793"
for i in 1 2 3; do
    "$etcd" --name "m$i" --data-dir "$dir/etcd-m$i" \
        --listen-client-urls "http://127.0.0.1:2379$i" \
        --advertise-client-urls "http://127.0.0.1:2379$i" \
        --listen-peer-urls "http://127.0.0.1:2380$i" \
        --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
        --initial-cluster "$cluster" --initial-cluster-state new \
        --initial-cluster-token leasehold-scale-out \
        >"$dir/etcd-m$i.log" 2>&1 &
    pids+=($!)
done

urls=()
for i in 1 2; do
    port=$((base + i))
    "$server" --listen "127.0.0.1:$port" --backend etcd --etcd-endpoints "$endpoints" \
        >"$dir/server-$i.log" 2>&1 &
    pids+=($!)
    urls+=("http://127.0.0.1:$port")
done

# Ready when both servers answer /healthz with 200 (etcd elected a leader and answers).
for url in "${urls[@]}"; do
    for _ in $(seq 1 300); do
        if curl -fsS "$url/healthz" >/dev/null 2>&1; then continue 2; fi
        sleep 0.1
    done
    echo "$url did not become healthy; see $dir/*.log" >&2
    exit 1
done

joined=$(IFS=,; echo "${urls[*]}")
cat <<INFO
Two leasehold servers over a 3-member etcd cluster (work directory $dir):
  ${urls[0]}  ${urls[1]}
Open mode: any API key names a project. Try:
  export LEASEHOLD_URL=$joined LEASEHOLD_API_KEY=demo
  leasehold run demo/job --label "\$(hostname)/1" -- sleep 30 &
  LEASEHOLD_URL=${urls[1]} leasehold list          # the other server sees the lock
  kill one etcd member (pids: ${pids[0]} ${pids[1]} ${pids[2]}): locks keep working
Console: ${urls[0]}/ui#key=demo      Metrics: ${urls[0]}/metrics
Ctrl-C stops everything.
INFO
wait
