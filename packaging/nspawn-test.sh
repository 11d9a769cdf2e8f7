#!/usr/bin/env bash
# Package boot test: install the .debs of volume-agent and volume-central (and Debian's
# postgresql) into a fresh Debian bookworm root file system, boot it with systemd-nspawn
# (a real systemd as PID 1, the shipped units and their hardening), and check, inside
# the booted guest, for volume-agent:
#
#   1. start-up: volume-agent.service becomes active, i.e. systemd got READY=1
#      (Type=notify), and the running process carries the unit's hardening
#      (no_new_privs, a seccomp filter, the capability bounding set of the unit);
#   2. the sandbox lets the agent work: an empty volume and a copy-on-write child of it
#      are created through the local API (127.0.0.1:7788); the child sees the parent's
#      file, its own writes stay out of the parent, and with the overlay driver the
#      child's overlay mount is visible outside the service (no private mount
#      namespace); `volume-agent volumes list` lists both; the driver is printed; an
#      image tar with a setuid file and a device node streams into a privileged volume
#      (owners 0, modes exact: chown, mknod and set-id bits allowed by the sandbox) and
#      is refused (400) by an unprivileged one (no device nodes there); without the
#      device node it streams into the unprivileged volume (root stored as the mapped top
#      id) and a privileged copy-on-write child of it gets the owners shifted back to 0;
#   3. watchdog: WATCHDOG=1 keeps arriving; after `kill -STOP` of the main process
#      systemd kills it for the watchdog (Result=watchdog) and restarts it;
#   4. crash safety: after SIGKILL, Restart=on-failure restarts it (Result=signal) and
#      the volumes are still listed, the child's contents intact and mounted once;
#   5. `systemctl stop`: the daemon sends STOPPING=1 and exits 0 well within
#      TimeoutStopSec (Result=success, ExecMainStatus=0);
#   6. `systemd-analyze security volume-agent.service`: the exposure figure is printed;
#
# and for volume-central, against the guest's PostgreSQL (the role and database made as
# the packaged config expects them: peer authentication over the unix socket):
#
#   7. the first start, on an empty database with no credential: the unit applies the
#      migrations (`run --migrate`; central_schema_migrations holds every one, read with
#      psql), then refuses to serve without a credential: exit status 78 and, for
#      RestartPreventExitStatus=78, no restart;
#   8. with a scheduler credential issued (`volume-central credentials issue` as the
#      service's user), the unit becomes active (READY=1), runs as volume-central with
#      no_new_privs, a seccomp filter and an empty capability bounding set, answers
#      /readyz and an authenticated API call;
#   9. watchdog: WATCHDOG=1 keeps arriving; after `kill -STOP` systemd kills it for the
#      watchdog and restarts it; after SIGKILL Restart=on-failure restarts it;
#  10. `systemctl stop`: STOPPING=1, exit status 0; the exposure figure is printed.
#
# The units are tested as shipped except for one drop-in each in the guest:
# WatchdogSec=5s instead of 30s, so the watchdog checks take seconds rather than half a
# minute (the daemons pet at half the interval systemd passes in WATCHDOG_USEC either
# way).
#
#   bash packaging/nspawn-test.sh [path/to/volume-agent_*.deb [path/to/volume-central_*.deb]]
#
# Needs root, mmdebstrap and systemd-container (apt-get install mmdebstrap
# systemd-container) and the Debian archive through this machine's apt sources (the root
# file system is downloaded on each run). The root file system is built on a tmpfs
# (removing its hundreds of MB of small files from a virtual disk alone can take half a
# minute), so the volumes root is a tmpfs too; NSPAWN_TEST_ON_DISK=1 builds it under
# /var/tmp instead. About two minutes in all, most of it mmdebstrap; it prints how long
# each phase took. CI runs it (.ci/steps/systemd-boot.sh).
#
# Exit status: 0 passed; 1 a check failed (the message names it; the service's journal
# follows); 77 this machine cannot run containers at all (not root, no namespaces, no
# usable cgroup file system): the reason is printed and nothing was checked.
set -euo pipefail
script=$(realpath "$0")
deb=${1:+$(realpath "$1")}
cdeb=${2:+$(realpath "$2")}
cd "$(dirname "$script")/.."

me=nspawn-test.sh
skip() {
	echo "$me: SKIPPED, cannot run here: $*" >&2
	exit 77
}

deb=${deb:-$(compgen -G "target/packages/volume-agent_*.deb" | head -n 1 || true)}
cdeb=${cdeb:-$(compgen -G "target/packages/volume-central_*.deb" | head -n 1 || true)}
[[ -f $deb && -f $cdeb ]] || {
	echo "$me: the volume-agent and volume-central .debs are neither given nor both in" \
		"target/packages (run packaging/build.sh)" >&2
	exit 1
}
for tool in mmdebstrap systemd-nspawn nsenter; do
	command -v "$tool" >/dev/null || {
		echo "$me: $tool missing: apt-get install mmdebstrap systemd-container" >&2
		exit 1
	}
done
[[ $(id -u) == 0 ]] || skip "needs root (mmdebstrap, systemd-nspawn and nsenter run as root)"

# A machine whose PID 1 is not systemd may have no cgroup file system mounted at all, and
# systemd-nspawn then refuses to run ("Failed to determine whether the unified cgroups
# hierarchy is used"). Mount cgroup2 there in a private mount namespace of this script
# (the machine's own mounts stay as they are) and run again inside it.
if ! mountpoint -q /sys/fs/cgroup && [[ -z ${NSPAWN_TEST_CGROUP_NS:-} ]]; then
	grep -qw cgroup2 /proc/filesystems ||
		skip "nothing is mounted at /sys/fs/cgroup and the kernel has no cgroup2 file system"
	echo "$me: nothing is mounted at /sys/fs/cgroup (PID 1 is not systemd?): running in a" \
		"private mount namespace with cgroup2 mounted there"
	exec unshare --mount --propagation private env NSPAWN_TEST_CGROUP_NS=1 bash -c '
		mount -t cgroup2 cgroup2 /sys/fs/cgroup || {
			echo "nspawn-test.sh: SKIPPED, cannot run here: cannot mount cgroup2 at /sys/fs/cgroup" >&2
			exit 77
		}
		exec bash "$@"' bash "$script" "$deb" "$cdeb"
fi

# Watchdog interval set by the test's drop-in; margins for the waits below.
watchdog_sec=5
machine=va-boot-$$

# Can this machine start a container at all? A container that runs `true` from the
# host's own /usr (no boot, nothing downloaded) needs the same namespaces and cgroup
# set-up as the boot below; if it fails, say why and skip instead of failing 2 minutes
# later. Anything that goes wrong after this point is a failure.
if ! probe=$(systemd-nspawn -q -D / --volatile=yes -M "$machine-probe" --register=no \
	--keep-unit --private-network true 2>&1); then
	skip "systemd-nspawn cannot start a container on this machine (cgroup file system" \
		"missing or read-only, namespaces refused, or similar): $probe"
fi

work=$(mktemp -d /var/tmp/volume-agent-nspawn.XXXXXX)
if [[ ${NSPAWN_TEST_ON_DISK:-0} != 1 ]]; then
	mount -t tmpfs -o mode=0755,size=2g volume-agent-nspawn "$work"
fi
rootfs=$work/rootfs
nspawn_pid=
leader=
failed=
cleanup() {
	if [[ -n $nspawn_pid ]] && kill -0 "$nspawn_pid" 2>/dev/null; then
		kill -TERM "$nspawn_pid" 2>/dev/null || true
		wait "$nspawn_pid" 2>/dev/null || true
	fi
	if mountpoint -q "$work"; then umount "$work"; fi
	rm -rf "$work"
}
trap cleanup EXIT

t0=$SECONDS
phase() { printf '==> [%3ds] %s\n' "$((SECONDS - t0))" "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
in_guest() { nsenter --target "$leader" --mount --uts --ipc --net --pid -- "$@"; }
# The unit under test: the helpers below (show_props, prop, wait_restart, fail) act on it.
unit=volume-agent.service
fail() {
	printf '%s: FAILED: %s\n' "$me" "$*" >&2
	if [[ -n $leader && -z $failed ]]; then
		failed=1
		echo "--- systemctl status $unit (guest)" >&2
		in_guest systemctl status --no-pager "$unit" >&2 || true
		echo "--- journal of $unit (guest)" >&2
		in_guest journalctl --no-pager -u "$unit" -n 60 >&2 || true
	fi
	exit 1
}

phase "mmdebstrap bookworm (systemd, systemd-sysv, dbus, curl, postgresql) from this machine's apt sources"
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
	[[ -f $f ]] && sources+=("$f")
done
mmdebstrap --variant=minbase --include=systemd,systemd-sysv,dbus,init-system-helpers,curl,postgresql \
	--skip=cleanup/apt bookworm "$rootfs" "${sources[@]}" >"$work/mmdebstrap.log" 2>&1 || {
	tail -n 30 "$work/mmdebstrap.log" >&2
	fail "mmdebstrap could not build the root file system (its log's end is above)"
}

phase "install $(basename "$deb") and a usable config"
cp "$deb" "$rootfs/tmp/volume-agent.deb"
chroot "$rootfs" dpkg -i /tmp/volume-agent.deb >"$work/dpkg.log" 2>&1 || {
	cat "$work/dpkg.log" >&2
	fail "dpkg -i of the .deb failed in the guest root"
}
# The packaged config's placeholders make the daemon refuse to start (by design); give it
# a worker name. The central URL points at a closed local port: the agent starts, reports
# READY and keeps retrying the central API with backoff (and, without an answer from it,
# never destroys anything by absence).
sed -i -e 's/^worker_name = .*/worker_name = "nspawn-boot-test"/' \
	-e 's|^url = .*|url = "http://127.0.0.1:9"|' "$rootfs/etc/volume-agent/config.toml"
[[ -L $rootfs/etc/systemd/system/multi-user.target.wants/volume-agent.service ]] ||
	fail "the postinst did not enable volume-agent.service"
grep -q '^WatchdogSec=30s$' "$rootfs/lib/systemd/system/volume-agent.service" ||
	fail "the installed unit has no WatchdogSec=30s: update the test's drop-in comment"
mkdir -p "$rootfs/etc/systemd/system/volume-agent.service.d"
cat >"$rootfs/etc/systemd/system/volume-agent.service.d/boot-test.conf" <<EOF
# nspawn-test.sh: a short watchdog so that the watchdog check takes seconds.
[Service]
WatchdogSec=${watchdog_sec}s
EOF

phase "install $(basename "$cdeb")"
cp "$cdeb" "$rootfs/tmp/volume-central.deb"
chroot "$rootfs" dpkg -i /tmp/volume-central.deb >"$work/dpkg-central.log" 2>&1 || {
	cat "$work/dpkg-central.log" >&2
	fail "dpkg -i of the volume-central .deb failed in the guest root"
}
grep -q '^volume-central:' "$rootfs/etc/passwd" || fail "the volume-central postinst made no system user"
[[ ! -e $rootfs/etc/systemd/system/multi-user.target.wants/volume-central.service ]] ||
	fail "the volume-central postinst enabled the unit before it has a database"
grep -q '^WatchdogSec=30s$' "$rootfs/lib/systemd/system/volume-central.service" ||
	fail "the installed volume-central unit has no WatchdogSec=30s: update the test's drop-in comment"
mkdir -p "$rootfs/etc/systemd/system/volume-central.service.d"
cat >"$rootfs/etc/systemd/system/volume-central.service.d/boot-test.conf" <<EOF
# nspawn-test.sh: a short watchdog so that the watchdog check takes seconds.
[Service]
WatchdogSec=${watchdog_sec}s
EOF
echo "nspawn-boot-test" >"$rootfs/etc/hostname"

phase "boot with systemd-nspawn"
# --register=no: no systemd-machined on the host; --keep-unit: stay in the caller's
# cgroup instead of asking the host's systemd for a scope (the container gets its own
# cgroup below this process's one). --private-network: the guest's loopback, so its
# 127.0.0.1:7788 never meets a port in use on the host.
systemd-nspawn -q -b -D "$rootfs" -M "$machine" --register=no --keep-unit \
	--private-network --console=passive >"$work/boot.log" 2>&1 &
nspawn_pid=$!

for _ in $(seq 1 120); do
	kill -0 "$nspawn_pid" 2>/dev/null || break
	leader=$(pgrep -P "$nspawn_pid" -x systemd || true)
	[[ -n $leader ]] && break
	sleep 0.5
done
[[ -n $leader ]] || {
	cat "$work/boot.log" >&2
	fail "the container did not boot (systemd-nspawn's output is above)"
}

# --- helpers on the guest's service -------------------------------------------------
# show_props A,B,...: fills the associative array P from `systemctl show`.
declare -A P
show_props() {
	local line key
	P=()
	for key in ${1//,/ }; do P[$key]=; done
	while IFS= read -r line; do
		P[${line%%=*}]=${line#*=}
	done < <(in_guest systemctl show -p "$1" "$unit")
}
prop() { in_guest systemctl show -P "$1" "$unit"; }
api() { in_guest curl -sS --max-time 10 "$@"; }
# api_call EXPECTED_STATUS METHOD PATH [JSON | CURL_ARGS...]: prints the body; fails on
# another status.
# With more arguments than 3 and the 4th starting with '-', they go to curl as they are.
api_call() {
	local want=$1 method=$2 path=$3 out code
	shift 3
	local args=(-X "$method" -w '\n%{http_code}' "http://127.0.0.1:7788$path")
	if [[ $# -gt 0 && $1 != -* ]]; then
		args+=(-H 'Content-Type: application/json' --data "$1")
	else
		args+=("$@")
	fi
	out=$(api "${args[@]}") || fail "$method $path: no answer from the agent's local API"
	code=${out##*$'\n'}
	out=${out%$'\n'*}
	[[ $code == "$want" ]] || fail "$method $path answered $code, expected $want: $out"
	printf '%s' "$out"
}
# json_field FIELD: the string value of "FIELD" in the JSON on stdin (flat, no escapes).
json_field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }
# The guest (minbase) has no procps: the shell's kill, with the guest's PIDs.
guest_kill() { in_guest sh -c 'kill "$@"' kill "$@"; }
volumes_list() { in_guest volume-agent volumes list 2>&1; }
# wait_restart N WHY EXPECTED_RESULT OLD_PID LIMIT: waits (up to LIMIT seconds) until
# NRestarts is N and the service is active again with a new main PID; fails unless
# Result=EXPECTED_RESULT was seen in between (while the restart was pending).
wait_restart() {
	local n=$1 why=$2 want=$3 old=$4 limit=$5 start=$SECONDS seen='' down_at=''
	while ((SECONDS - start <= limit)); do
		show_props ActiveState,SubState,Result,NRestarts,MainPID
		if [[ ${P[ActiveState]} != active && -z $down_at ]]; then
			down_at=$((SECONDS - start))
		fi
		[[ ${P[Result]} == "$want" ]] && seen=1
		if [[ ${P[NRestarts]} == "$n" && ${P[ActiveState]} == active &&
			${P[MainPID]} != 0 && ${P[MainPID]} != "$old" ]]; then
			[[ -n $seen ]] || fail "$why: restarted, but Result=$want was never seen"
			restart_down_after=${down_at:-0}
			restart_total=$((SECONDS - start))
			return 0
		fi
		sleep 0.2
	done
	fail "$why: not restarted within ${limit}s (state ${P[ActiveState]}/${P[SubState]}," \
		"Result=${P[Result]}, NRestarts=${P[NRestarts]}, MainPID=${P[MainPID]}, was $old)"
}

# check_started READY_CALL empty|some: waits until $unit is active (READY=1, which the
# daemon sends with READY_CALL), checks the unit's type, watchdog and drop-in, sets pid
# to its main PID and checks the main process's hardening: no_new_privs, a seccomp
# filter and the unit's capability bounding set (empty, or some capabilities).
check_started() {
	state=unknown
	for _ in $(seq 1 120); do
		state=$(in_guest systemctl is-active "$unit" 2>/dev/null || true)
		case $state in
		active | failed) break ;;
		esac
		sleep 0.5
	done
	phase "$unit is $state"
	case $state in
	active) ;;
	activating)
		fail "still activating after 60s: systemd got no READY=1 (Type=notify); the daemon" \
			"must call $1 once start-up is done" ;;
	*) fail "$unit is $state, not active" ;;
	esac
	show_props MainPID,NRestarts,WatchdogUSec,DropInPaths,NotifyAccess,Type
	pid=${P[MainPID]}
	[[ ${P[Type]} == notify ]] || fail "Type=${P[Type]}, expected notify"
	[[ ${P[NRestarts]} == 0 ]] || fail "NRestarts=${P[NRestarts]} before any test: the service restarted at start-up"
	[[ ${P[WatchdogUSec]} == "${watchdog_sec}s" ]] ||
		fail "WatchdogUSec=${P[WatchdogUSec]}, expected the drop-in's ${watchdog_sec}s"
	[[ ${P[DropInPaths]} == "/etc/systemd/system/$unit.d/boot-test.conf" ]] ||
		fail "unexpected drop-ins in the guest: ${P[DropInPaths]}"
	ok "active (READY=1 received), main PID $pid"

	status=$(in_guest cat "/proc/$pid/status")
	grep -q '^NoNewPrivs:[[:space:]]*1$' <<<"$status" || fail "the main process runs without no_new_privs (NoNewPrivileges=yes)"
	grep -q '^Seccomp:[[:space:]]*2$' <<<"$status" || fail "the main process has no seccomp filter (SystemCallFilter=)"
	# The bounding set the unit asks for, as a mask: bit numbers are the line numbers of
	# `setpriv --list-caps` (util-linux, in the guest), which lists capabilities in order.
	mapfile -t all_caps < <(in_guest setpriv --list-caps)
	want_mask=0
	for c in $(prop CapabilityBoundingSet); do
		found=
		for i in "${!all_caps[@]}"; do
			if [[ ${all_caps[$i]} == "${c#cap_}" ]]; then
				want_mask=$((want_mask | (1 << i)))
				found=1
			fi
		done
		[[ -n $found ]] || fail "setpriv does not know the capability $c"
	done
	have_mask=$((16#$(sed -n 's/^CapBnd:[[:space:]]*//p' <<<"$status")))
	[[ $2 == empty ]] || ((want_mask != 0)) || fail "$unit asks for no capability, expected some"
	((have_mask == want_mask)) ||
		fail "the main process's capability bounding set is $(printf '%#x' "$have_mask"), the unit's is $(printf '%#x' "$want_mask")"
	ok "hardening in force: no_new_privs, seccomp filter, capability bounding set $(printf '%#x' "$have_mask")"
}

# check_watchdog_restart: WATCHDOG=1 keeps arriving; after kill -STOP of the main
# process systemd kills it for the watchdog (Result=watchdog) and restarts it (the first
# restart: NRestarts=1); pid is the new main PID.
check_watchdog_restart() {
	w1=$(prop WatchdogTimestampMonotonic)
	sleep "$watchdog_sec"
	w2=$(prop WatchdogTimestampMonotonic)
	((w2 > w1)) || fail "no WATCHDOG=1 from the daemon for ${watchdog_sec}s (WatchdogTimestampMonotonic stayed $w1)"
	ok "WATCHDOG=1 arriving (last at monotonic $w2 us)"
	restart_sec=$(($(prop RestartUSec | sed -n 's/^\([0-9]*\)s$/\1/p') + 0))
	guest_kill -STOP "$pid" || fail "kill -STOP $pid failed in the guest"
	wait_restart 1 "watchdog after SIGSTOP" watchdog "$pid" $((watchdog_sec + restart_sec + 20))
	((restart_down_after <= watchdog_sec + 5)) ||
		fail "systemd took ${restart_down_after}s to act on the stopped daemon, over WatchdogSec=${watchdog_sec}s"
	journal=$(in_guest journalctl --no-pager -o cat -u "$unit")
	grep -q 'Watchdog timeout' <<<"$journal" ||
		fail "Result=watchdog but the journal has no 'Watchdog timeout' line"
	if guest_kill -0 "$pid" 2>/dev/null; then fail "the stopped daemon (PID $pid) is still there"; fi
	old=$pid
	pid=$(prop MainPID)
	ok "killed for the watchdog ${restart_down_after}s after SIGSTOP (Result=watchdog), restarted as PID $pid after ${restart_total}s (RestartSec=${restart_sec}s)"
}

# check_sigkill_restart: after SIGKILL, Restart=on-failure restarts the service (the
# second restart: NRestarts=2); pid is the new main PID.
check_sigkill_restart() {
	guest_kill -KILL "$pid" || fail "kill -KILL $pid failed in the guest"
	wait_restart 2 "restart after SIGKILL" signal "$pid" $((restart_sec + 20))
	pid=$(prop MainPID)
	ok "restarted by Restart=on-failure (Result=signal) as PID $pid after ${restart_total}s"
}

# print_exposure: systemd-analyze security's overall exposure line for $unit, printed
# and kept in exposure.
print_exposure() {
	phase "systemd-analyze security $unit (in the guest)"
	security=$(in_guest systemd-analyze security --no-pager "$unit" 2>&1) ||
		fail "systemd-analyze security failed: $security"
	exposure=$(grep -o 'Overall exposure level for .*' <<<"$security") ||
		fail "no overall exposure line in systemd-analyze security's output: $security"
	echo "    $exposure"
}

# check_stop LOG_LINE: systemctl stop of $unit: systemd gets STOPPING=1 from the main
# process (pid), the daemon logs LOG_LINE (a grep pattern) and exits 0.
check_stop() {
	phase "systemctl stop $unit"
	# PID 1 logs each notification it receives at debug level only.
	in_guest systemd-analyze log-level debug
	stop_limit=$(prop TimeoutStopUSec)
	start=$SECONDS
	in_guest timeout 600 systemctl stop "$unit" || fail "systemctl stop failed"
	stop_took=$((SECONDS - start))
	in_guest systemd-analyze log-level info
	show_props ActiveState,Result,ExecMainCode,ExecMainStatus,NRestarts
	[[ ${P[ActiveState]} == inactive ]] || fail "after systemctl stop the service is ${P[ActiveState]}, not inactive"
	[[ ${P[Result]} == success ]] || fail "systemctl stop: Result=${P[Result]}, expected success"
	# ExecMainCode 1 is CLD_EXITED (exited, not killed by a signal).
	[[ ${P[ExecMainCode]} == 1 && ${P[ExecMainStatus]} == 0 ]] ||
		fail "systemctl stop: the daemon did not exit 0 (ExecMainCode=${P[ExecMainCode]}, ExecMainStatus=${P[ExecMainStatus]})"
	journal=$(in_guest journalctl --no-pager -o cat -u "$unit")
	grep -q "Got notification message from PID $pid (.*STOPPING=1" <<<"$journal" ||
		fail "systemd got no STOPPING=1 from the daemon (PID $pid) on stop"
	grep -q "$1" <<<"$journal" || fail "the daemon did not log '$1' (its shutdown did not finish)"
	ok "STOPPING=1 received, exit status 0, Result=success in ${stop_took}s (TimeoutStopSec=$stop_limit)"
}

# --- 1. start-up: READY=1 and the hardening --------------------------------------------
check_started "volume_agent::notify::ready()" some

# --- 2. volumes through the local API and the CLI ---------------------------------------
phase "create volumes through the local API"
api_call 200 GET /healthz >/dev/null
parent=$(api_call 201 POST /volumes '{"handle":"boot-parent","strategy":{"type":"empty"}}')
parent_path=$(json_field path <<<"$parent")
[[ -n $parent_path ]] || fail "POST /volumes answered no path: $parent"
in_guest sh -c "echo from-parent >'$parent_path/hello'" ||
	fail "cannot write into the new volume at $parent_path"
api_call 204 PUT /volumes/boot-parent/state '{"state":"initialized"}' >/dev/null
child=$(api_call 201 POST /volumes '{"handle":"boot-child","strategy":{"type":"cow","volume":"boot-parent"}}')
child_path=$(json_field path <<<"$child")
[[ -n $child_path ]] || fail "POST /volumes (cow) answered no path: $child"
[[ $(in_guest cat "$child_path/hello" 2>&1) == from-parent ]] ||
	fail "the copy-on-write child at $child_path does not show the parent's file"
in_guest sh -c "echo from-child >'$child_path/own'" || fail "cannot write into the child at $child_path"
if in_guest test -e "$parent_path/own"; then fail "a write into the child reached the parent"; fi
driver=$(in_guest journalctl --no-pager -o cat -u "$unit" |
	sed -n 's/.*volume inventory open .*driver=\([A-Za-z]*\).*/\1/p' | tail -n 1)
[[ -n $driver ]] || fail "the journal has no 'volume inventory open ... driver=' line"
# A mount the service makes must be visible outside it (the container runtime mounts the
# volume paths): this looks from the guest's own mount namespace, not the service's.
child_mounts() { in_guest findmnt -n -o FSTYPE --mountpoint "$child_path" | grep -c overlay || true; }
if [[ $driver == Overlay ]]; then
	[[ $(child_mounts) == 1 ]] ||
		fail "driver Overlay, but the child $child_path is not an overlay mount outside the service"
	ok "driver: Overlay; the child is an overlay mount, visible outside the service"
else
	ok "driver: $driver (overlay mounts refused under the volumes root here)"
fi
list=$(volumes_list) || fail "volume-agent volumes list failed: $list"
printf '%s\n' "$list" | sed 's/^/    | /'
for h in boot-parent boot-child; do
	grep -q "$h" <<<"$list" || fail "volume-agent volumes list does not list $h"
done
ok "empty volume and copy-on-write child created; the CLI lists both"

# An image as a root file system carries setuid files and device nodes, owned by root.
# A privileged volume keeps both as they are (CAP_CHOWN, CAP_MKNOD, CAP_FSETID and no
# device policy in the unit); an unprivileged one refuses device nodes (400), as
# baggageclaim's user-namespaced tar fails on them, and stores root as the mapped top id;
# a privileged copy-on-write child of it shifts the owners back to 0.
phase "stream an image (setuid file, device node) in; privileged copy-on-write child of it"
# shellcheck disable=SC2016 # expanded by the guest's shell
in_guest sh -c 'set -e; d=$(mktemp -d); mkdir "$d/bin" "$d/dev"
	printf "#!/bin/sh\n" >"$d/bin/su"; chmod 4755 "$d/bin/su"
	tar -C "$d" --numeric-owner -cf /tmp/image-nodev.tar .
	mknod "$d/dev/null" c 1 3; chmod 666 "$d/dev/null"
	tar -C "$d" --numeric-owner -cf /tmp/image.tar .; rm -rf "$d"' ||
	fail "cannot build the test image tars in the guest"
# The agent's mapped root: the highest id of the guest's user namespace (as it reads it).
top=0
while read -r inside _ count; do
	((inside + count - 1 > top)) && top=$((inside + count - 1))
done < <(in_guest cat /proc/1/uid_map)
# check_entry VOLUME_PATH ENTRY EXPECTED: `stat` of the entry is EXPECTED.
check_entry() {
	local got
	got=$(in_guest stat -c '%u:%g %a %F %t,%T' "$1/$2" 2>&1) || fail "missing $1/$2: $got"
	[[ $got == "$3" ]] || fail "$1/$2 is '$got', expected '$3'"
}
rootfs=$(api_call 201 POST /volumes '{"handle":"boot-rootfs","strategy":{"type":"empty"},"privileged":true}')
rootfs_path=$(json_field path <<<"$rootfs")
api_call 204 PUT '/volumes/boot-rootfs/stream-in?path=.' -H 'Content-Encoding: raw' \
	--data-binary @/tmp/image.tar >/dev/null
check_entry "$rootfs_path" bin/su "0:0 4755 regular file 0,0"
check_entry "$rootfs_path" dev/null "0:0 666 character special file 1,3"
image=$(api_call 201 POST /volumes '{"handle":"boot-image","strategy":{"type":"empty"}}')
image_path=$(json_field path <<<"$image")
api_call 400 PUT '/volumes/boot-image/stream-in?path=.' -H 'Content-Encoding: raw' \
	--data-binary @/tmp/image.tar >/dev/null
in_guest test ! -e "$image_path/dev/null" || fail "a refused device node was left in $image_path"
api_call 204 PUT '/volumes/boot-image/stream-in?path=.' -H 'Content-Encoding: raw' \
	--data-binary @/tmp/image-nodev.tar >/dev/null
api_call 204 PUT /volumes/boot-image/state '{"state":"initialized"}' >/dev/null
image_priv=$(api_call 201 POST /volumes \
	'{"handle":"boot-image-priv","strategy":{"type":"cow","volume":"boot-image"},"privileged":true}')
image_priv_path=$(json_field path <<<"$image_priv")
check_entry "$image_path" bin/su "$top:$top 4755 regular file 0,0"
check_entry "$image_priv_path" bin/su "0:0 4755 regular file 0,0"
ok "setuid file and device node kept in a privileged volume; the device refused by an unprivileged one, root stored as $top there and shifted back to 0 in its privileged child"

# --- 3. watchdog --------------------------------------------------------------------------
phase "watchdog: SIGSTOP the main process (WatchdogSec=${watchdog_sec}s)"
check_watchdog_restart

# --- 4. SIGKILL: restart and crash safety -------------------------------------------------
phase "SIGKILL the main process"
check_sigkill_restart
list=$(volumes_list) || fail "volume-agent volumes list failed after the restarts: $list"
for h in boot-parent boot-child boot-rootfs boot-image boot-image-priv; do
	grep -q "$h" <<<"$list" || fail "after the restarts, volume-agent volumes list does not list $h: $list"
done
[[ $(in_guest cat "$child_path/hello" 2>&1) == from-parent && $(in_guest cat "$child_path/own" 2>&1) == from-child ]] ||
	fail "after the restarts the child's contents at $child_path are not intact"
if [[ $driver == Overlay ]]; then
	n=$(child_mounts)
	[[ $n == 1 ]] || fail "after the restarts the child $child_path has $n overlay mounts, expected 1"
fi
api_call 200 GET /volumes/boot-child >/dev/null
ok "all five volumes survived the watchdog kill and SIGKILL, contents intact$([[ $driver == Overlay ]] && echo ', child mounted once')"

# --- 6. (before stopping it) the security exposure ------------------------------------
print_exposure
agent_exposure=$exposure

# --- 5. systemctl stop: STOPPING=1 and a clean exit ---------------------------------------
check_stop 'volume_agent::daemon: stopped'

# --- 7. volume-central: the first start migrates, then refuses without a credential -----
unit=volume-central.service
central_config=/etc/volume-central/volume-central.toml
# as_user USER CMD...: CMD in the guest as USER (peer authentication names the role).
as_user() {
	local user=$1
	shift
	in_guest runuser -u "$user" -- "$@"
}
# psql_value SQL: the one value SQL selects in the volume_central database.
psql_value() { as_user postgres psql -X -q -t -A -d volume_central -c "$1"; }
phase "PostgreSQL in the guest: the role and database the packaged config names"
for _ in $(seq 1 120); do
	as_user postgres psql -X -q -t -A -c 'SELECT 1' >/dev/null 2>&1 && break
	sleep 0.5
done
as_user postgres psql -X -q -t -A -c 'SELECT 1' >/dev/null 2>&1 ||
	fail "PostgreSQL did not come up in the guest within 60s (systemctl status postgresql@15-main)"
as_user postgres createuser volume-central || fail "createuser volume-central failed in the guest"
as_user postgres createdb -O volume-central volume_central || fail "createdb volume_central failed in the guest"
ok "PostgreSQL $(psql_value 'SHOW server_version') up; role volume-central owns database volume_central"

phase "first start of $unit: empty database, no credential issued"
want_migrations=$(compgen -G 'central/migrations/*.sql' | wc -l)
in_guest systemctl start "$unit" 2>/dev/null && fail "$unit started without any credential issued"
show_props ActiveState,Result,ExecMainCode,ExecMainStatus,NRestarts
[[ ${P[ActiveState]} == failed && ${P[ExecMainCode]} == 1 && ${P[ExecMainStatus]} == 78 ]] ||
	fail "without a credential: ${P[ActiveState]}, ExecMainCode=${P[ExecMainCode]}, ExecMainStatus=${P[ExecMainStatus]}; expected failed with exit status 78"
[[ ${P[NRestarts]} == 0 ]] || fail "exit status 78 was restarted (NRestarts=${P[NRestarts]}): RestartPreventExitStatus=78 missing?"
in_guest journalctl --no-pager -o cat -u "$unit" | grep -q 'no credential is issued' ||
	fail "the journal does not say that no credential is issued"
migrations=$(psql_value 'SELECT count(*) FROM central_schema_migrations') ||
	fail "no central_schema_migrations table in the guest's database: the unit did not migrate"
[[ $migrations == "$want_migrations" ]] ||
	fail "central_schema_migrations holds $migrations migrations, central/migrations has $want_migrations"
ok "migrations applied by the unit ($migrations in central_schema_migrations, latest $(psql_value 'SELECT max(version) FROM central_schema_migrations')); exit status 78 without a credential, not restarted"

# --- 8. with a credential: READY=1, the hardening, the API -------------------------------
phase "issue a scheduler credential, systemctl enable --now $unit"
token=$(as_user volume-central volume-central credentials issue --scheduler --config "$central_config" 2>/dev/null) ||
	fail "volume-central credentials issue --scheduler failed in the guest"
[[ -n $token ]] || fail "credentials issue printed no token"
in_guest systemctl reset-failed "$unit"
# As the README's operator path: enable --now (an enabled unit also stays loaded after
# the stop below, so its exit status can be read).
in_guest systemctl enable --now "$unit" 2>/dev/null ||
	fail "systemctl enable --now $unit failed with a credential issued"
check_started "volume_central::notify::ready()" empty
[[ $(sed -n 's/^Uid:[[:space:]]*\([0-9]*\).*/\1/p' <<<"$status") == $(in_guest id -u volume-central) ]] ||
	fail "the main process does not run as the user volume-central"
status_text=$(prop StatusText)
[[ $status_text == serving* ]] || fail "StatusText after READY=1 is '$status_text', expected 'serving ...'"
ready=$(api -w '\n%{http_code}' http://127.0.0.1:8080/readyz) || fail "GET /readyz: no answer from volume-central"
[[ ${ready##*$'\n'} == 200 ]] || fail "GET /readyz answered ${ready##*$'\n'}: ${ready%$'\n'*}"
workers=$(api -w '\n%{http_code}' -H "Authorization: Bearer $token" http://127.0.0.1:8080/api/v1/workers) ||
	fail "GET /api/v1/workers: no answer from volume-central"
[[ ${workers##*$'\n'} == 200 ]] || fail "GET /api/v1/workers with the scheduler's token answered ${workers##*$'\n'}: ${workers%$'\n'*}"
ok "runs as volume-central; status '$status_text'; /readyz 200; the scheduler's credential is accepted"

# --- 9. watchdog and SIGKILL ----------------------------------------------------------------
phase "watchdog: SIGSTOP the main process of $unit (WatchdogSec=${watchdog_sec}s)"
check_watchdog_restart
phase "SIGKILL the main process of $unit"
check_sigkill_restart
ready=$(api -w '\n%{http_code}' http://127.0.0.1:8080/readyz) || fail "GET /readyz: no answer after the restarts"
[[ ${ready##*$'\n'} == 200 ]] || fail "GET /readyz answered ${ready##*$'\n'} after the restarts"
ok "ready again after the restarts"

# --- 10. the exposure, then systemctl stop ---------------------------------------------------
print_exposure
central_exposure=$exposure
check_stop 'volume_central.* stopped$'

phase "power off the guest"
in_guest systemctl poweroff >/dev/null 2>&1 || true
for _ in $(seq 1 60); do
	kill -0 "$nspawn_pid" 2>/dev/null || break
	sleep 0.5
done
if kill -0 "$nspawn_pid" 2>/dev/null; then fail "the guest did not power off within 30s"; fi
wait "$nspawn_pid" 2>/dev/null || true
nspawn_pid=
phase "passed: driver $driver; $agent_exposure; $central_exposure"
