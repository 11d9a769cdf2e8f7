#!/usr/bin/env bash
# build.sh — builds LazyFS from the vendored sources in src/ (offline: CMakeLists.txt uses
# Debian's libtoml11-dev and libspdlog-dev instead of upstream's download of them) and
# prints the path of the binary. Reuses an earlier build when no source is newer.
#
# Needs: g++ make cmake pkg-config libfuse3-dev libtoml11-dev libspdlog-dev (and fuse3 at run
# time for fusermount3). Env: LAZYFS_BUILD_DIR (default <repo>/target/lazyfs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=${LAZYFS_BUILD_DIR:-${CARGO_TARGET_DIR:-$repo/target}/lazyfs}
bin=$build/lazyfs
if [[ -x $bin ]] && [[ -z $(find "$here/src" "$here/CMakeLists.txt" -newer "$bin" -print -quit) ]]; then
	echo "$bin"
	exit 0
fi
cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >&2
cmake --build "$build" -j"$(nproc)" >&2
[[ -x $bin ]] || {
	echo "build.sh: no binary at $bin after the build" >&2
	exit 1
}
echo "$bin"
