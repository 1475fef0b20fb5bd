#!/bin/sh
# The vendored Pingora crates are the published 0.9.1 ones plus pingora.patch, nothing else
# (third_party/PATCHES.md). Run by .ci/run. `--write` regenerates pingora.patch instead.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/a" "$work/b"
# The published crates' checksums (as crates.io's index and Cargo.lock had them).
sum_pingora_core=a535f47f65fdcb003f9e1df04cd18e614c128dfe9388acce3f211ae38ac14d68
sum_pingora_pool=ecda093a10bad5e887d73286f052dd0fc78ad0d6c7654235e507ed0f85b64af1
sum_pingora_proxy=8e3d5670490740405ecc8c6f75c3fcbce4d24f7adaffb355ca44550e7918e358
# The patch only counts while Cargo.lock takes these crates from here, not from crates.io.
for c in pingora-core pingora-pool pingora-proxy; do
    if grep -A3 "^name = \"$c\"\$" "$here/../Cargo.lock" | grep -q '^source = '; then
        echo "third_party: Cargo.lock takes $c from a registry: the [patch.crates-io] no longer applies" >&2
        exit 1
    fi
done
for c in pingora-core pingora-pool pingora-proxy; do
    curl -sSfL -o "$work/$c.crate" "https://static.crates.io/crates/$c/$c-0.9.1.crate"
    case $c in
    pingora-core) sum=$sum_pingora_core ;;
    pingora-pool) sum=$sum_pingora_pool ;;
    pingora-proxy) sum=$sum_pingora_proxy ;;
    *)
        echo "third_party: no checksum for $c" >&2
        exit 1
        ;;
    esac
    echo "$sum  $work/$c.crate" | sha256sum -c --quiet -
    tar -xzf "$work/$c.crate" -C "$work"
    mkdir -p "$work/a/$c" "$work/b/$c"
    cp -r "$work/$c-0.9.1/src" "$work/$c-0.9.1/Cargo.toml" "$work/$c-0.9.1/LICENSE" "$work/a/$c/"
    cp -r "$here/$c/src" "$here/$c/Cargo.toml" "$here/$c/LICENSE" "$work/b/$c/"
done
if [ "${1:-}" = "--write" ]; then
    rc=0
    (cd "$work" && diff -ruN a b >"$work/patch") || rc=$?
    if [ "$rc" -gt 1 ]; then
        echo "third_party: diff failed ($rc)" >&2
        exit 1
    fi
    sed -E 's/^(\+\+\+|---) ([^\t]+)\t.*/\1 \2/' "$work/patch" >"$here/pingora.patch"
    echo "wrote $here/pingora.patch"
    exit 0
fi
(cd "$work/a" && patch -s -p1 <"$here/pingora.patch")
if ! diff -r "$work/a" "$work/b" >"$work/diff"; then
    cat "$work/diff"
    echo "third_party: the vendored Pingora differs from 0.9.1 + pingora.patch (regenerate: $0 --write)" >&2
    exit 1
fi
echo "third_party: pingora-core, pingora-pool and pingora-proxy are 0.9.1 + pingora.patch"
