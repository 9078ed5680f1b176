#!/bin/sh
# Martinet @VERSION@: one file holding a PyInstaller one-folder build as a gzipped tar.
# The first run unpacks it into a cache folder; every run then replaces this script with the
# program itself (exec), so the pid you see is Martinet's and `kill -9` ends it.
# Needs only sh, tail, tar, gzip and mktemp. MARTINET_CACHE overrides the cache folder.
set -eu
cache_root="${MARTINET_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/martinet}"
target="$cache_root/@BUILD_ID@"
if [ ! -x "$target/martinet" ]; then
    mkdir -p "$cache_root"
    unpacking=$(mktemp -d "$target.XXXXXX")
    trap 'rm -rf "$unpacking"' EXIT INT TERM
    tail -c +@OFFSET@ "$0" | tar -xzf - -C "$unpacking"
    # Another run may have unpacked the same build meanwhile: keep whichever landed first.
    [ -x "$target/martinet" ] || mv "$unpacking" "$target"
    rm -rf "$unpacking"
    trap - EXIT INT TERM
fi
exec "$target/martinet" "$@"
