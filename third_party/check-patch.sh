#!/bin/sh
# The vendored Pingora crates are the published 0.9.1 ones plus pingora.patch, nothing else
# (third_party/PATCHES.md). Run by .ci/run. `--write` regenerates pingora.patch instead.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/a" "$work/b"
for c in pingora-core pingora-pool; do
    curl -sSfL "https://static.crates.io/crates/$c/$c-0.9.1.crate" | tar -xz -C "$work"
    mkdir -p "$work/a/$c" "$work/b/$c"
    cp -r "$work/$c-0.9.1/src" "$work/$c-0.9.1/Cargo.toml" "$work/a/$c/"
    cp -r "$here/$c/src" "$here/$c/Cargo.toml" "$work/b/$c/"
done
if [ "${1:-}" = "--write" ]; then
    (cd "$work" && diff -ruN a b || true) |
        sed -E 's/^(\+\+\+|---) ([^\t]+)\t.*/\1 \2/' >"$here/pingora.patch"
    echo "wrote $here/pingora.patch"
    exit 0
fi
(cd "$work/a" && patch -s -p1 <"$here/pingora.patch")
if ! diff -r "$work/a" "$work/b" >"$work/diff"; then
    cat "$work/diff"
    echo "third_party: the vendored Pingora differs from 0.9.1 + pingora.patch (regenerate: $0 --write)" >&2
    exit 1
fi
echo "third_party: pingora-core and pingora-pool are 0.9.1 + pingora.patch"
