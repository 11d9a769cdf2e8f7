#!/usr/bin/env bash
# CI step: the volume-contents tests again with their temporary directories on an xfs loop
# image (reflink=1). There the copy-on-write copy runs one walker per core and copies files
# on the walkers, forcing the log once instead of fsyncing each entry (fsx::Journal::Ordered),
# so the swapper races, the regressions and the walker tests cover that path too. Needs root,
# mkfs.xfs (xfsprogs, in .ci/packages.txt) and loop devices; skips with a reason without the
# last two.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v mkfs.xfs >/dev/null; then
	echo "contents-on-xfs.sh: mkfs.xfs not found (apt-get install xfsprogs)" >&2
	exit 1
fi

work=$(mktemp -d)
cleanup() {
	umount "$work/mnt" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
truncate -s 2G "$work/xfs.img"
mkfs.xfs -q -f -m reflink=1 "$work/xfs.img"
mkdir "$work/mnt"
if ! mount -o loop "$work/xfs.img" "$work/mnt"; then
	echo "contents-on-xfs.sh: skipped: cannot mount a loop image here (not root, or no loop devices)"
	exit 0
fi

TMPDIR=$work/mnt cargo test -p volume-agent --locked \
	--test contents_races --test contents_regressions --test contents_copy \
	--test inventory_lifecycle
