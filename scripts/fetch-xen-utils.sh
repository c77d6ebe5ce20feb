#!/usr/bin/env bash
# Downloads Debian's xen-utils-4.17 and unpacks it into DEST (default .cache/xen-utils-4.17),
# for Xen's own test-xenstore. The package is unpacked, never installed.
set -euo pipefail
dest=${1:-.cache/xen-utils-4.17}
mkdir -p "$dest.debs"
if ! ls "$dest.debs"/xen-utils-4.17_*.deb >/dev/null 2>&1; then
    if ! (cd "$dest.debs" && apt-get download -qq xen-utils-4.17 libxenstore4 2>/dev/null); then
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        (cd "$dest.debs" && apt-get download -qq xen-utils-4.17 libxenstore4)
    fi
fi
rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
for deb in "$dest.debs"/*.deb; do dpkg -x "$deb" "$dest.tmp"; done
rm -rf "$dest" && mv "$dest.tmp" "$dest"
test -x "$dest/usr/lib/xen-4.17/bin/test-xenstore"
