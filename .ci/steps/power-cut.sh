#!/usr/bin/env bash
# CI step: the power-cut tests (tests/tests/power_cut.rs). Builds LazyFS from the vendored
# sources in tests/lazyfs/ (once; later runs reuse the build), then runs the tests, which
# are #[ignore]d in the ordinary test run because they mount a FUSE file system.
#
# Needs root and /dev/fuse. Without FUSE (no /dev/fuse even after `modprobe fuse`) the step
# says so and skips; anything else that goes wrong fails it.
set -euo pipefail
cd "$(dirname "$0")/../.."

step() { printf '\n--> power-cut: %s\n' "$*"; }
skip() {
	printf 'power-cut.sh: SKIPPED: %s\n' "$*"
	exit 0
}

if [[ $(id -u) -ne 0 ]]; then skip "not root (mounting LazyFS needs root)"; fi
if [[ ! -e /dev/fuse ]]; then
	step "no /dev/fuse: modprobe fuse"
	if command -v modprobe >/dev/null; then modprobe fuse 2>&1 || true; fi
	[[ -e /dev/fuse ]] || skip "/dev/fuse is missing and modprobe fuse did not make it: no FUSE on this machine"
fi

step "build dependencies"
bash .ci/install.sh g++ make cmake pkg-config fuse3 libfuse3-dev libtoml11-dev libspdlog-dev

step "LazyFS (vendored sources, built once)"
LAZYFS_BIN=$(bash tests/lazyfs/build.sh)
export LAZYFS_BIN
echo "$LAZYFS_BIN"

step "build the tests"
cargo test -p e2e --test power_cut --locked --no-run

step "run the tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
timeout 240 cargo test -p e2e --test power_cut --locked -- --ignored --test-threads=1 --nocapture 2>&1 | tee "$log"
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
