#!/usr/bin/env bash
# Puts NVIDIA's perf_analyzer (the reference KServe v2 / Triton load generator) under DIR, without root and
# without touching the system, and prints the path to run: DIR/bin/perf_analyzer.
#
# Usage: benchmarks/install_perf_analyzer.sh DIR [VERSION]      (VERSION defaults to 2.60.0)
#
# Where it comes from: PyPI's `perf-analyzer` wheel carries the C++ binary (perf_analyzer/bin/perf_analyzer).
# Its console script drops the binary's exit status, so we run the binary itself. The wheel is built for
# manylinux_2_38: the binary needs glibc >= 2.38 and a libstdc++ with GLIBCXX_3.4.32 (GCC 13), plus
# libssl3 and zlib. Debian 13, Ubuntu 24.04 and Fedora 39 or newer run it as it is. On an older Debian or
# Ubuntu, the script fetches Debian 13's libc6, libstdc++6 and libgcc-s1 packages with apt-get (no root
# needed for a download), unpacks them under DIR/runtime, and DIR/bin/perf_analyzer starts the binary with
# that glibc's own dynamic loader; the system's libssl and zlib are still used. Elsewhere, use the
# perf_analyzer in NVIDIA's Triton SDK container (nvcr.io/nvidia/tritonserver:<release>-py3-sdk).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 DIR [VERSION]" >&2
    exit 2
fi
version=${2:-2.60.0}
mkdir -p "$1"
dest=$(cd "$1" && pwd)
launcher="$dest/bin/perf_analyzer"
binary="$dest/libexec/perf_analyzer"

works() { "$1" --version >/dev/null 2>&1; }

if [ -x "$launcher" ] && works "$launcher"; then
    echo "$launcher"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest/bin" "$dest/libexec"

echo "downloading perf-analyzer $version from PyPI" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$work/wheel" \
    --platform manylinux_2_38_x86_64 --python-version 3.11 "perf-analyzer==$version"
python3 -m zipfile -e "$work"/wheel/perf_analyzer-*.whl "$work/unpacked"
install -m 755 "$work/unpacked/perf_analyzer/bin/perf_analyzer" "$binary"

if works "$binary"; then
    ln -sf "$binary" "$launcher"
    echo "$launcher"
    exit 0
fi

# The system's C and C++ runtimes are too old for this build: borrow Debian 13's, privately.
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "perf_analyzer $version needs glibc >= 2.38 and GLIBCXX_3.4.32, which this system lacks, and the" >&2
    echo "fallback needs apt-get and dpkg-deb; run it from NVIDIA's Triton SDK container instead." >&2
    exit 1
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
if [ ! -r "$keyring" ]; then
    echo "the fallback verifies Debian's packages with $keyring: install the debian-archive-keyring package" >&2
    exit 1
fi
echo "this system's glibc/libstdc++ are older than the binary needs; fetching Debian 13's into $dest/runtime" >&2
apt_dir="$work/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/debs"
echo "deb [signed-by=$keyring] http://deb.debian.org/debian trixie main" >"$apt_dir/sources.list"
cat >"$apt_dir/apt.conf" <<CONF
Dir::Etc::SourceList "$apt_dir/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::State::Lists "$apt_dir/lists";
Dir::Cache::Archives "$apt_dir/archives";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT::Sandbox::User "$(id -un)";
CONF
APT_CONFIG="$apt_dir/apt.conf" apt-get -qq update
(cd "$apt_dir/debs" && APT_CONFIG="$apt_dir/apt.conf" apt-get -qq download libc6 libstdc++6 libgcc-s1)
rm -rf "$dest/runtime"
for deb in "$apt_dir"/debs/*.deb; do
    dpkg-deb --extract "$deb" "$dest/runtime"
done
libs="$dest/runtime/usr/lib/x86_64-linux-gnu"
if [ ! -e "$libs/ld-linux-x86-64.so.2" ]; then
    echo "unexpected package layout: no dynamic loader under $libs" >&2
    exit 1
fi
rm -f "$launcher"
cat >"$launcher" <<LAUNCHER
#!/bin/sh
# perf_analyzer under the glibc and libstdc++ unpacked in $dest/runtime (the system's are too old for it).
exec "$libs/ld-linux-x86-64.so.2" --library-path "$libs:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" \\
    "$binary" "\$@"
LAUNCHER
chmod 755 "$launcher"
if ! works "$launcher"; then
    "$launcher" --version >&2 || true
    echo "perf_analyzer still does not start under the borrowed runtime (message above)" >&2
    exit 1
fi
echo "$launcher"
