#!/usr/bin/env bash
# Installs the Debian packages the tests and the compose demo drive: libxenstore's command-line
# clients; docker.io (dockerd 20.10) and docker-compose 1.29, whose `config` validates
# compose.yaml without a Docker engine; debootstrap, which builds the image's base; strace,
# which checks that the durable store's file layer records every operation.
set -euo pipefail
need=()
command -v xenstore-read >/dev/null 2>&1 || need+=(xenstore-utils)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
command -v strace >/dev/null 2>&1 || need+=(strace)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -qq "${need[@]}" >/dev/null; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
