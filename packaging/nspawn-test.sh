#!/usr/bin/env bash
# Boot test: install the .deb into a fresh Debian root file system, boot it with
# systemd-nspawn, and check that systemd runs volume-agent as a Type=notify service
# (READY=1 received, so `systemctl is-active` says active).
#
#   bash packaging/nspawn-test.sh [path/to/volume-agent_*.deb]
#
# Needs root, mmdebstrap and systemd-container (apt-get install mmdebstrap
# systemd-container) and the Debian archive through this machine's apt sources. Not part
# of CI: it downloads a root file system each run (about 3 minutes here) and boots it.
# It prints how long each phase took.
set -euo pipefail
cd "$(dirname "$0")/.."

deb=${1:-$(ls target/packages/volume-agent_*.deb 2>/dev/null | head -n 1)}
[[ -f $deb ]] || {
	echo "nspawn-test.sh: no .deb given and none in target/packages (run packaging/build.sh)" >&2
	exit 1
}
for tool in mmdebstrap systemd-nspawn; do
	command -v "$tool" >/dev/null || {
		echo "nspawn-test.sh: $tool missing: apt-get install mmdebstrap systemd-container" >&2
		exit 1
	}
done

work=$(mktemp -d /var/tmp/volume-agent-nspawn.XXXXXX)
rootfs=$work/rootfs
machine=va-boot-$$
nspawn_pid=
cleanup() {
	if [[ -n $nspawn_pid ]] && kill -0 "$nspawn_pid" 2>/dev/null; then
		kill -TERM "$nspawn_pid" 2>/dev/null || true
		wait "$nspawn_pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT

t0=$SECONDS
phase() { printf '==> [%3ds] %s\n' "$((SECONDS - t0))" "$*"; }

phase "mmdebstrap bookworm (systemd, systemd-sysv, dbus) from this machine's apt sources"
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
	[[ -f $f ]] && sources+=("$f")
done
mmdebstrap --variant=minbase --include=systemd,systemd-sysv,dbus,init-system-helpers \
	--skip=cleanup/apt bookworm "$rootfs" "${sources[@]}" >"$work/mmdebstrap.log" 2>&1 || {
	tail -n 30 "$work/mmdebstrap.log" >&2
	exit 1
}

phase "install $(basename "$deb") and a usable config"
cp "$deb" "$rootfs/tmp/volume-agent.deb"
chroot "$rootfs" dpkg -i /tmp/volume-agent.deb
# The packaged config's placeholders make the daemon refuse to start (by design); give it
# a worker name. The central URL points at a closed local port: the agent starts, reports
# READY and keeps retrying the central API with backoff.
sed -i -e 's/^worker_name = .*/worker_name = "nspawn-boot-test"/' \
	-e 's|^url = .*|url = "http://127.0.0.1:9"|' "$rootfs/etc/volume-agent/config.toml"
[[ -L $rootfs/etc/systemd/system/multi-user.target.wants/volume-agent.service ]] || {
	echo "nspawn-test.sh: the postinst did not enable volume-agent.service" >&2
	exit 1
}
echo "nspawn-boot-test" >"$rootfs/etc/hostname"

phase "boot with systemd-nspawn"
# --register=no: no systemd-machined on the host; --keep-unit: stay in the caller's
# cgroup instead of asking the host's systemd for a scope. The container gets its own
# cgroup below this process's one when the host allows it.
systemd-nspawn -q -b -D "$rootfs" -M "$machine" --register=no --keep-unit \
	--console=passive >"$work/boot.log" 2>&1 &
nspawn_pid=$!

leader=
for _ in $(seq 1 120); do
	kill -0 "$nspawn_pid" 2>/dev/null || break
	leader=$(pgrep -P "$nspawn_pid" -x systemd || true)
	[[ -n $leader ]] && break
	sleep 0.5
done
[[ -n $leader ]] || {
	echo "nspawn-test.sh: the container did not boot" >&2
	cat "$work/boot.log" >&2
	exit 1
}
in_guest() { nsenter --target "$leader" --mount --uts --ipc --net --pid -- "$@"; }

state=unknown
for _ in $(seq 1 120); do
	state=$(in_guest systemctl is-active volume-agent.service 2>/dev/null || true)
	case $state in
	active | failed) break ;;
	esac
	sleep 1
done
phase "volume-agent.service is $state"
if [[ $state == activating ]]; then
	echo "nspawn-test.sh: still activating: systemd got no READY=1 (Type=notify); the daemon" >&2
	echo "nspawn-test.sh: must call volume_agent::notify::ready() once start-up is done" >&2
fi
in_guest systemctl status --no-pager volume-agent.service || true
in_guest journalctl --no-pager -u volume-agent.service -n 30 || true
in_guest systemctl poweroff >/dev/null 2>&1 || true
wait "$nspawn_pid" 2>/dev/null || true
nspawn_pid=
phase "done"
[[ $state == active ]]
