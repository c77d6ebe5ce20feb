#!/usr/bin/env bash
# make compose: the demo under docker-compose, for real.  Starts dockerd if none runs (and stops
# it afterwards), builds the image (scripts/build-image.sh), runs compose.yaml until host A's
# toolstack has run the demo, checks its JSON (scripts/check-compose-demo.py), and tears
# everything down with `down -v`: no container, network or volume is left.
# Usage: compose-demo.sh PYTHON   (the host interpreter that builds the wheels and checks)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: compose-demo.sh PYTHON}
DOCKER=${DOCKER:-docker}
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-physmaplab$$}
OUT=build/compose
COMPOSE=(docker-compose -f compose.yaml)
mkdir -p "$OUT"
started=$(date +%s)
dockerd_pid=""
say() { echo "make compose: $*"; }

stop_dockerd() {
    if [ -n "$dockerd_pid" ]; then
        say "stopping the dockerd it started (pid $dockerd_pid)"
        kill "$dockerd_pid" 2>/dev/null || true
        wait "$dockerd_pid" 2>/dev/null || true
    fi
}

teardown() {
    local rc=$?
    "${COMPOSE[@]}" down -v --remove-orphans >"$OUT/down.log" 2>&1 || {
        cat "$OUT/down.log" >&2
        rc=1
    }
    local label="label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" left=""
    left+=$("$DOCKER" ps -aq --filter "$label")
    left+=$("$DOCKER" network ls -q --filter "$label")
    left+=$("$DOCKER" volume ls -q --filter "$label")
    if [ -n "$left" ]; then
        echo "make compose: left behind by $COMPOSE_PROJECT_NAME: $left" >&2
        rc=1
    fi
    stop_dockerd
    exit "$rc"
}

if ! "$DOCKER" info >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || { echo "make compose: no Docker engine runs, and starting dockerd needs root" >&2; exit 1; }
    say "starting dockerd (log: $OUT/dockerd.log)"
    dockerd >"$OUT/dockerd.log" 2>&1 &
    dockerd_pid=$!
    trap stop_dockerd EXIT
    for _ in $(seq 120); do
        "$DOCKER" info >/dev/null 2>&1 && break
        kill -0 "$dockerd_pid" 2>/dev/null || { tail -20 "$OUT/dockerd.log" >&2; exit 1; }
        sleep 0.5
    done
    "$DOCKER" info >/dev/null 2>&1 || { echo "make compose: dockerd did not come up" >&2; exit 1; }
fi

bash scripts/build-image.sh "$PY"
built=$(date +%s)

trap teardown EXIT
say "docker-compose up (project $COMPOSE_PROJECT_NAME; log: $OUT/up.log)"
status=0
"${COMPOSE[@]}" up --no-build --abort-on-container-exit --exit-code-from toolstack-a \
    >"$OUT/up.log" 2>&1 || status=$?
container=$("${COMPOSE[@]}" ps -q toolstack-a)
if [ -n "$container" ]; then
    "$DOCKER" logs "$container" >"$OUT/demo.json" 2>"$OUT/demo.log" || true
    # Host A's audit logs, for a look at who did what once the volume is gone.
    rm -rf "$OUT/audit"
    "$DOCKER" cp "$container:/run/physmap-lab/audit" "$OUT/audit" >/dev/null 2>&1 || true
fi
if [ "$status" -ne 0 ]; then
    echo "make compose: the demo exited with $status" >&2
    tail -40 "$OUT/up.log" >&2
fi
"$PY" scripts/check-compose-demo.py "$OUT/demo.json"
say "image $((built - started)) s, demo $(($(date +%s) - built)) s, total $(($(date +%s) - started)) s"
exit "$status"
