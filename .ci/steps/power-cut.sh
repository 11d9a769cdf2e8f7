#!/usr/bin/env bash
# CI step: the power-cut tests (tests/tests/power_cut.rs). Installs LazyFS's build
# dependencies (also listed in .ci/packages.txt, so .ci/run has them already), builds and
# installs LazyFS with the shared tools' lazyfs/setup.sh (a third-party tool, not in this
# tree; skipped when `lazyfs` is already on PATH), checks that
# a FUSE file system can be mounted here, then runs the tests, which are #[ignore]d in the
# ordinary test run because they mount one.
#
# It skips (exit 0, with the reason printed) only when mounting FUSE is impossible on this
# machine: not root, no /dev/fuse even after `modprobe fuse`, or the kernel refusing the
# mount. Anything else that goes wrong (a package, the build, a test) fails it.
#
# POWER_CUT_ROUNDS (power cuts per test, default 12 here: about 30 s of tests) and
# POWER_CUT_SEED are passed to the tests. SHARED_TOOLS_DIR names the shared tools
# folder (default: `shared/tools` beside this repository's folder).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never} CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
export POWER_CUT_ROUNDS=${POWER_CUT_ROUNDS:-12}

step() { printf '\n--> power-cut: %s\n' "$*"; }
skip() {
	printf 'power-cut.sh: SKIPPED: %s\n' "$*"
	exit 0
}
started=$SECONDS

if [[ $(id -u) -ne 0 ]]; then skip "not root (mounting LazyFS needs root)"; fi
if [[ ! -e /dev/fuse ]]; then
	step "no /dev/fuse: modprobe fuse"
	if command -v modprobe >/dev/null; then modprobe fuse 2>&1 || true; fi
	[[ -e /dev/fuse ]] || skip "/dev/fuse is missing and modprobe fuse did not make it: no FUSE on this machine"
fi

step "build dependencies"
bash .ci/install.sh g++ make cmake pkg-config fuse3 libfuse3-dev libtoml11-dev libspdlog-dev

step "LazyFS (the shared tools' setup.sh, built once)"
t=$SECONDS
if ! LAZYFS_BIN=$(command -v lazyfs); then
	tools=${SHARED_TOOLS_DIR:-$(pwd)/../shared/tools}
	[[ -f $tools/lazyfs/setup.sh ]] || {
		echo "power-cut.sh: FAILED: no $tools/lazyfs/setup.sh (set SHARED_TOOLS_DIR to the shared tools folder)" >&2
		exit 1
	}
	# -O1: the template-heavy files (toml11, spdlog) build in about 60 % of the -O2 time, and
	# LazyFS's own speed is not what the tests measure. CXXFLAGS reach CMake's first configure.
	CXXFLAGS="-O1 -g -DNDEBUG" SKIP_APT=1 LAZYFS_BUILD_DIR=$(pwd)/target/lazyfs-build \
		bash "$tools/lazyfs/setup.sh" >&2
	LAZYFS_BIN=$(command -v lazyfs || echo /usr/local/bin/lazyfs)
fi
export LAZYFS_BIN
echo "$LAZYFS_BIN ($((SECONDS - t)) s)"

step "can this machine mount FUSE? (a LazyFS mount on an empty directory)"
probe=$(mktemp -d)
waiter=
cleanup() {
	if mountpoint -q "$probe/mnt" 2>/dev/null; then umount "$probe/mnt" || umount -l "$probe/mnt" || true; fi
	if [[ -n $waiter ]]; then
		if kill -0 "$waiter" 2>/dev/null && [[ -s $probe/pid ]]; then kill "$(cat "$probe/pid")" 2>/dev/null || true; fi
		wait "$waiter" || true
	fi
	# Never delete through a mount.
	mountpoint -q "$probe/mnt" 2>/dev/null || rm -rf "$probe"
}
trap cleanup EXIT
mkdir "$probe/mnt" "$probe/backing"
printf '[faults]\nfifo_path="%s"\n[cache]\napply_eviction=false\n[cache.simple]\ncustom_size="1mb"\nblocks_per_page=1\n[filesystem]\nlog_all_operations=false\nlogfile="%s"\n' \
	"$probe/faults.fifo" "$probe/lazyfs.log" >"$probe/lazyfs.toml"
# LazyFS aborts (SIGABRT) when it stops after the unmount, which is harmless: it runs under
# a subshell that waits for it with stderr closed, so bash's "Aborted" notice stays out of the log.
(
	ulimit -c 0
	"$LAZYFS_BIN" "$probe/mnt" --config-path "$probe/lazyfs.toml" -o allow_other \
		-o modules=subdir -o "subdir=$probe/backing" -f </dev/null >"$probe/out" 2>&1 &
	echo $! >"$probe/pid"
	wait $!
) 2>/dev/null &
waiter=$!
for _ in $(seq 100); do
	mountpoint -q "$probe/mnt" && break
	kill -0 "$waiter" 2>/dev/null || break
	sleep 0.1
done
if ! mountpoint -q "$probe/mnt"; then
	cat "$probe/out" "$probe/lazyfs.log" >&2 || true
	if grep -qiE 'operation not permitted|permission denied|/dev/fuse|fusermount' "$probe/out"; then
		skip "this machine refuses FUSE mounts: $(grep -iE 'operation not permitted|permission denied|/dev/fuse|fusermount' "$probe/out" | head -1)"
	fi
	echo "power-cut.sh: FAILED: LazyFS did not mount, and not for want of FUSE (output above)" >&2
	exit 1
fi
echo "mounted and writable: $(echo probe >"$probe/mnt/probe" && cat "$probe/mnt/probe")"
cleanup
waiter=
trap - EXIT

step "build the tests"
cargo test -p e2e --test power_cut --locked --no-run

step "run the tests ($POWER_CUT_ROUNDS power cuts each)"
export POWER_CUT_REQUIRE_LAZYFS=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
t=$SECONDS
timeout 900 cargo test -p e2e --test power_cut --locked -- --ignored --test-threads=1 --nocapture 2>&1 | tee "$log"
# The tests skip themselves (and pass) when they find no LazyFS, FUSE or root; here they
# were all checked above, so a skip is a failure of this step.
if grep -q '^SKIPPED' "$log"; then
	echo "power-cut.sh: FAILED: a test skipped itself although LazyFS, FUSE and root are here" >&2
	exit 1
fi
grep -q 'test result: ok. [1-9]' "$log" || {
	echo "power-cut.sh: FAILED: no power-cut test ran" >&2
	exit 1
}
echo "power-cut.sh: tests $((SECONDS - t)) s, whole step $((SECONDS - started)) s"
