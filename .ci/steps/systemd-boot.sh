#!/usr/bin/env bash
# CI step: boot the built .debs under a real systemd (packaging/nspawn-test.sh): a fresh
# Debian root file system from this machine's apt sources, booted with systemd-nspawn,
# where volume-agent's hardened unit must start (READY=1), create volumes (copy-on-write
# included), be killed and restarted by its watchdog and by Restart=on-failure with its
# volumes kept, and stop cleanly; and volume-central's, beside the guest's PostgreSQL,
# must migrate the database, refuse to serve without a credential (exit 78, no restart),
# start (READY=1) once one is issued, be restarted by its watchdog and after SIGKILL,
# and stop cleanly. Runs after packages.sh, which builds target/packages/*.deb.
#
# This machine runs no systemd as PID 1; that is fine, the container brings its own. Where
# containers cannot run at all (no namespaces, no usable cgroup file system) the test
# prints why and the step passes as SKIPPED; set VOLUME_AGENT_REQUIRE_BOOT_TEST=1 to make
# that a failure instead.
set -euo pipefail
cd "$(dirname "$0")/../.."

debs=()
for product in volume-agent volume-central; do
	mapfile -t found < <(compgen -G "target/packages/${product}_*.deb" || true)
	if ((${#found[@]} != 1)); then
		echo "systemd-boot.sh: FAILED: expected one target/packages/${product}_*.deb (from packages.sh), found ${#found[@]}" >&2
		exit 1
	fi
	debs+=("${found[0]}")
done

rc=0
bash packaging/nspawn-test.sh "${debs[@]}" || rc=$?
case $rc in
0) ;;
77)
	if [[ ${VOLUME_AGENT_REQUIRE_BOOT_TEST:-0} == 1 ]]; then
		echo "systemd-boot.sh: FAILED: the boot test could not run here (reason above) and VOLUME_AGENT_REQUIRE_BOOT_TEST=1" >&2
		exit 1
	fi
	echo "systemd-boot.sh: SKIPPED: the boot test cannot run on this machine (reason above); nothing was checked"
	;;
*)
	echo "systemd-boot.sh: FAILED: packaging/nspawn-test.sh exited $rc (the failed check is named above)" >&2
	exit "$rc"
	;;
esac
