#!/usr/bin/env bash
# Downloads Debian's xen-utils-4.17 and the libraries its test-xenstore and xenstore-control
# link, and unpacks them into DEST (default .cache/xen-utils-4.17), so that
# LD_LIBRARY_PATH=DEST/usr/lib/x86_64-linux-gnu DEST/usr/lib/xen-4.17/bin/test-xenstore runs.
# The packages are unpacked, never installed.
set -euo pipefail
dest=${1:-.cache/xen-utils-4.17}
pkgs=(xen-utils-4.17 libxenstore4 libxentoolcore1 libxenmisc4.17 libxentoollog1 libxencall1
      libxenevtchn1 libxengnttab1 libxenforeignmemory1 libxendevicemodel1)
mkdir -p "$dest.debs"
missing=()
for p in "${pkgs[@]}"; do
    ls "$dest.debs/${p}_"*.deb >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if ! (cd "$dest.debs" && apt-get download -qq "${missing[@]}" 2>/dev/null); then
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        (cd "$dest.debs" && apt-get download -qq "${missing[@]}")
    fi
fi
rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
for deb in "$dest.debs"/*.deb; do dpkg -x "$deb" "$dest.tmp"; done
rm -rf "$dest" && mv "$dest.tmp" "$dest"
test -x "$dest/usr/lib/xen-4.17/bin/test-xenstore"
test -e "$dest/usr/lib/x86_64-linux-gnu/libxentoolcore.so.1"
test -e "$dest/usr/lib/x86_64-linux-gnu/libxenctrl.so.4.17"
