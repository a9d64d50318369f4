#!/usr/bin/env bash
# The layout of deploy/compose.yaml as plain processes, for a machine without Docker:
# N replicas of `python app.py` on 127.0.0.1, HAProxy in front, one PostgreSQL you provide.
#
#   DATABASE_URL=postgresql://... SESSION_SECRET=$(openssl rand -base64 48) ACCESS_KEY=... \
#       deploy/run.sh [up] [REPLICAS]     start (default 2 replicas) and stay in the foreground
#   deploy/run.sh start [REPLICAS]        start in the background (state in $RUN_DIR)
#   deploy/run.sh replica I               (re)start replica I, e.g. after a crash
#   deploy/run.sh stop                    stop everything started from $RUN_DIR
#
# HAProxy listens on $LB_PORT (8080) at $LB_BIND (127.0.0.1; 0.0.0.0 to serve other
# machines); replicas on $FIRST_PORT (8001) and up. Logs and pid files go to $RUN_DIR
# (./run/deploy). Needs haproxy (apt-get install haproxy) and the project's .venv (make install).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${RUN_DIR:-run/deploy}
LB_PORT=${LB_PORT:-8080}
LB_BIND=${LB_BIND:-127.0.0.1}
FIRST_PORT=${FIRST_PORT:-8001}
PYTHON=${PYTHON:-.venv/bin/python}
HAPROXY=${HAPROXY:-haproxy}
mkdir -p "$RUN_DIR"

need() {
    : "${DATABASE_URL:?set DATABASE_URL: the PostgreSQL database every replica shares}"
    : "${SESSION_SECRET:?set SESSION_SECRET (openssl rand -base64 48): the same for every replica}"
    : "${ACCESS_KEY:?set ACCESS_KEY: the owner key, the same for every replica}"
    command -v "$HAPROXY" >/dev/null || { echo "haproxy not found: apt-get install haproxy" >&2; exit 2; }
}

wait_healthy() {  # url, name[, pid file of the process that must stay alive meanwhile]
    for _ in $(seq 1 600); do
        if [ -n "${3:-}" ] && ! kill -0 "$(cat "$3")" 2>/dev/null; then
            echo "$2 exited (port taken?); see $RUN_DIR" >&2
            return 1
        fi
        if "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "$2 did not answer $1; see $RUN_DIR" >&2
    return 1
}

replica() {  # I: start replica I on FIRST_PORT + I - 1
    local i=$1 port=$((FIRST_PORT + $1 - 1))
    stop_pid "$RUN_DIR/replica$i.pid"
    # HAProxy is the only client a replica sees: believe its X-Forwarded-For (client address).
    PORT=$port GRADIO_SERVER_NAME=127.0.0.1 FORWARDED_ALLOW_IPS=127.0.0.1 \
        DATA_DIR="$RUN_DIR/replica$i" nohup "$PYTHON" app.py >>"$RUN_DIR/replica$i.log" 2>&1 &
    echo $! >"$RUN_DIR/replica$i.pid"
    wait_healthy "http://127.0.0.1:$port/health" "replica $i" "$RUN_DIR/replica$i.pid"
}

balancer() {  # N: HAProxy over replicas 1..N, with deploy/haproxy.cfg's settings
    local n=$1 cfg="$RUN_DIR/haproxy.cfg"
    sed -e "s|^    bind \*:8080|    bind $LB_BIND:$LB_PORT|" -e '/^    server replica/d' \
        deploy/haproxy.cfg >"$cfg"
    for i in $(seq 1 "$n"); do
        echo "    server replica$i 127.0.0.1:$((FIRST_PORT + i - 1)) cookie replica$i" >>"$cfg"
    done
    stop_pid "$RUN_DIR/haproxy.pid"
    "$HAPROXY" -f "$cfg" -D -p "$RUN_DIR/haproxy.pid"
    wait_healthy "http://127.0.0.1:$LB_PORT/health" "haproxy" "$RUN_DIR/haproxy.pid"
}

stop_pid() {  # stop the process in a pid file, and wait until it is gone (port free)
    if [ -f "$1" ]; then
        local pid
        pid=$(cat "$1")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$1"
    fi
}

stop() {
    for pid in "$RUN_DIR"/*.pid; do
        [ -e "$pid" ] && stop_pid "$pid"
    done
    return 0
}

start() {  # N
    need
    local n=${1:-2}
    for i in $(seq 1 "$n"); do replica "$i"; done
    balancer "$n"
    echo "serving on http://127.0.0.1:$LB_PORT with $n replicas (logs in $RUN_DIR)"
}

case "${1:-up}" in
    up)
        trap stop EXIT
        trap 'exit 143' INT TERM
        start "${2:-2}"
        # A sleep in the background: bash runs a trap only once its foreground command ends.
        while true; do
            sleep 3600 &
            wait $!
        done
        ;;
    start) start "${2:-2}" ;;
    replica) need; replica "${2:?which replica}" ;;
    stop) stop ;;
    *) echo "usage: deploy/run.sh [up|start] [REPLICAS] | replica I | stop" >&2; exit 2 ;;
esac
