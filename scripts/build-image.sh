#!/usr/bin/env bash
# Builds the image of compose.yaml with no container registry:
#   1. the base: `debootstrap --variant=minbase bookworm` from Debian's packages, `docker import`ed
#      as physmap-lab-base:bookworm (rebuilt only when its recipe below changes);
#   2. the wheelhouse: the project's dependencies and the project itself as wheels, built here
#      with the host's pip (inside a container HTTPS to PyPI may not verify);
#   3. physmap-lab:latest from the Dockerfile, which installs the wheelhouse with --no-index.
# Docker's layer cache keeps step 3 to the layers whose wheels changed.
# Usage: build-image.sh PYTHON   (the interpreter whose pip builds the wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: build-image.sh PYTHON}
DOCKER=${DOCKER:-docker}
BASE=${PHYSMAP_LAB_BASE:-physmap-lab-base:bookworm}
IMAGE=${PHYSMAP_LAB_IMAGE:-physmap-lab:latest}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# python3-venv for the image's virtualenv; xenstore-utils for libxenstore's own clients.
PACKAGES=python3,python3-venv,xenstore-utils
WHEELS=build/wheelhouse

say() { echo "make image: $*"; }

base_recipe() {
    printf '%s\n' "$SUITE" minbase "$PACKAGES" "trim-v1" | sha256sum | cut -c1-16
}

base_current() {
    "$DOCKER" image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$BASE" 2>/dev/null \
        | grep -qx "PHYSMAP_LAB_BASE_RECIPE=$1"
}

build_base() {
    local recipe root
    recipe=$(base_recipe)
    if base_current "$recipe"; then
        say "base $BASE is current"
        return
    fi
    command -v debootstrap >/dev/null || { echo "make image: debootstrap is not installed (run make setup)" >&2; exit 1; }
    root=$(mktemp -d /tmp/physmap-lab-rootfs.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$PWD/.cache/debootstrap"
    say "debootstrap $SUITE ($PACKAGES) from $MIRROR"
    debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$PWD/.cache/debootstrap" \
        "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
        || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
    rm -f "$root.log"
    # What a container never needs: package lists, downloaded packages, documentation.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
        "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
    tar -C "$root" --numeric-owner -c . | "$DOCKER" import \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV PHYSMAP_LAB_BASE_RECIPE=$recipe" \
        --change 'CMD ["/bin/bash"]' \
        - "$BASE" >/dev/null
    rm -rf "$root"
    trap - EXIT
    say "imported $BASE"
}

# The project's runtime dependencies, as pyproject.toml lists them.
dependencies() {
    "$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))'
}

build_wheels() {
    local deps_key
    deps_key=$(cat pyproject.toml | sha256sum | cut -c1-16)
    if [ "$(cat "$WHEELS/deps/.key" 2>/dev/null)" != "$deps_key" ]; then
        say "wheels of the dependencies"
        rm -rf "$WHEELS/deps"
        mkdir -p "$WHEELS/deps"
        dependencies >"$WHEELS/deps/requirements.txt"
        "$PY" -m pip wheel -q --wheel-dir "$WHEELS/deps" -r "$WHEELS/deps/requirements.txt"
        echo "$deps_key" >"$WHEELS/deps/.key"
    fi
    # The project's own wheel; setuptools' build/lib would keep modules deleted since.
    say "wheel of the project"
    rm -rf build/lib build/bdist.* "$WHEELS/project.new"
    SOURCE_DATE_EPOCH=315532800 "$PY" -m pip wheel -q --no-deps --wheel-dir "$WHEELS/project.new" .
    rm -rf build/lib build/bdist.*
    # An identical wheel keeps its file, so Docker's cache keeps the layer.
    if ! cmp -s "$WHEELS"/project.new/*.whl "$WHEELS"/project/*.whl 2>/dev/null; then
        rm -rf "$WHEELS/project"
        mv "$WHEELS/project.new" "$WHEELS/project"
    else
        rm -rf "$WHEELS/project.new"
    fi
}

build_base
build_wheels
say "docker build $IMAGE"
DOCKER_BUILDKIT=0 "$DOCKER" build -q -t "$IMAGE" . >/dev/null
say "$IMAGE $("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE" | cut -c1-19)"
