#!/usr/bin/env bash
# CI step: build the .deb and .rpm of volume-agent and volume-central, lint them, verify
# the systemd units, and install, remove and purge each .deb on this machine (and install
# each .rpm into a scratch root).
#
# This machine runs no systemd as PID 1: the maintainer scripts must (and do) skip
# starting and stopping the service there, while still enabling it.
set -euo pipefail
cd "$(dirname "$0")/../.."

step() { printf '\n--> packages: %s\n' "$*"; }
fail() {
	printf 'packages.sh: FAILED: %s\n' "$*" >&2
	exit 1
}
expect_file() { [[ -e $1 ]] || fail "expected $1 to exist"; }
expect_gone() { [[ ! -e $1 ]] || fail "expected $1 to be gone"; }

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# A package left installed by an interrupted earlier run would hide install problems.
for package in volume-agent volume-central; do
	if dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q installed; then
		step "purging a $package package left from an earlier run"
		dpkg -P "$package"
	fi
done

# new_rpm_root DIR: an empty rpm database under DIR with a /bin/sh (dash and the
# libraries it links), so rpm can run the scriptlets inside it. systemctl and
# systemd-tmpfiles are absent there, as on a minimal image: the scriptlets must skip
# what they cannot do and exit 0.
new_rpm_root() {
	local root=$1 lib
	mkdir -p "$root/bin"
	cp "$(command -v dash)" "$root/bin/sh"
	for lib in $(ldd "$(command -v dash)" | grep -o '/[^ ]*'); do
		mkdir -p "$root$(dirname "$lib")"
		cp "$lib" "$root$lib"
	done
	rpm --root "$root" --initdb
}
# rpm_run LOG RPM-ARGS...: runs rpm, its output also in LOG; fails when a scriptlet did.
rpm_run() {
	local log=$1
	shift
	rpm "$@" 2>&1 | tee "$log"
	if grep -q 'scriptlet failed' "$log"; then fail "an rpm scriptlet failed: rpm $*"; fi
}

# verify_unit PRODUCT BIN: systemd-analyze verify and security of the product's unit.
# verify checks that ExecStart's binary exists, so the packaged unit (/usr/bin/...) is
# verified against a copy that runs the freshly built binary instead; the man page it
# names is not installed yet, hence --man=no. After dpkg -i the installed unit is
# verified again as shipped, binary and man page included.
verify_unit() {
	local product=$1 built
	built=$(realpath "$2")
	step "$product: systemd-analyze verify (copy of the unit with ExecStart on the built binary)"
	sed "s|^ExecStart=/usr/bin/$product |ExecStart=$built |" \
		"systemd/$product.service" >"$scratch/$product.service"
	grep -q "^ExecStart=$built run " "$scratch/$product.service" || fail "$product: ExecStart not rewritten"
	systemd-analyze verify --man=no "$scratch/$product.service"
	systemd-analyze security --offline=yes "$scratch/$product.service" | tail -n 1
}

# lint PRODUCT DEB RPM: lintian and rpmlint; errors fail, warnings are printed.
lint() {
	step "$1: lintian (errors fail; warnings are printed)"
	lintian --fail-on error --info "$2"
	step "$1: rpmlint (errors fail)"
	rpmlint -c packaging/rpm/rpmlint.toml "$3"
}

# check_rpm PRODUCT RPM CONFIG POST_LINE FILE...: the rpm holds the binary, unit, man
# page, licence, CONFIG as %config(noreplace) and the FILEs; its scriptlets exist and
# %post has POST_LINE; it installs into a scratch root (scriptlets run), verifies, and
# its erase keeps a changed CONFIG as .rpmsave.
check_rpm() {
	local product=$1 rpm=$2 config=$3 post_line=$4 f s
	shift 4
	step "$product: rpm contents and scriptlets"
	rpm -qip "$rpm"
	rpm -qlp "$rpm" | tee "$scratch/$product-rpm-files"
	for f in "/usr/bin/$product" "/usr/lib/systemd/system/$product.service" "$config" \
		"/usr/share/man/man1/$product.1.gz" "/usr/share/licenses/$product/LICENSE" "$@"; do
		grep -qx "$f" "$scratch/$product-rpm-files" || fail "$f missing from the $product rpm"
	done
	rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpm" | grep -q "^cn $config\$" ||
		fail "$config is not %config(noreplace) in the $product rpm"
	rpm -qp --scripts "$rpm" | tee "$scratch/$product-rpm-scripts"
	for s in postinstall preuninstall postuninstall; do
		grep -q "^$s scriptlet" "$scratch/$product-rpm-scripts" || fail "the $product rpm has no $s scriptlet"
	done
	grep -qF "$post_line" "$scratch/$product-rpm-scripts" || fail "the $product %post has no '$post_line'"

	step "$product: rpm install into a scratch root, scriptlets included"
	local root=$scratch/$product-rpmroot
	new_rpm_root "$root"
	rpm_run "$scratch/$product-rpm-install.log" --root "$root" --nodeps -i "$rpm"
	rpm --root "$root" -q "$product"
	rpm --root "$root" -V --nodeps "$product" || fail "rpm -V: installed files differ from the $product package"
	for f in "/usr/bin/$product" "/usr/lib/systemd/system/$product.service" "$config"; do
		expect_file "$root$f"
	done
	"$root/usr/bin/$product" --help >/dev/null
	echo '# changed by the operator' >>"$root$config"
	rpm_run "$scratch/$product-rpm-erase.log" --root "$root" --nodeps -e "$product"
	expect_gone "$root/usr/bin/$product"
	# %config(noreplace): a changed config survives erase as .rpmsave.
	expect_file "$root$config.rpmsave"
}

step "build"
bash packaging/build.sh
deb=$(ls target/packages/volume-agent_*.deb)
rpm=$(ls target/packages/volume-agent-[0-9]*.rpm)
bin=${CARGO_TARGET_DIR:-target}/release/volume-agent

step "the packaged config: refused with its placeholder, accepted (every key) once named"
if "$bin" config check --config packaging/config.toml >"$scratch/check.out" 2>&1; then
	fail "volume-agent accepted the packaged config with worker_name still the placeholder"
fi
grep -q worker_name "$scratch/check.out" || fail "the refusal does not name worker_name: $(cat "$scratch/check.out")"
sed 's/^worker_name = .*/worker_name = "ci-worker"/' packaging/config.toml >"$scratch/config.toml"
"$bin" config check --config "$scratch/config.toml" >/dev/null

verify_unit volume-agent "$bin"
lint volume-agent "$deb" "$rpm"
check_rpm volume-agent "$rpm" /etc/volume-agent/config.toml \
	'systemctl --no-reload preset volume-agent.service' \
	/usr/lib/tmpfiles.d/volume-agent.conf /usr/share/bash-completion/completions/volume-agent \
	/usr/share/zsh/site-functions/_volume-agent /usr/share/fish/vendor_completions.d/volume-agent.fish \
	/usr/share/volume-agent/resource-types/README

step "deb: install"
dpkg -i "$deb"
dpkg-query -W -f='${Status}\n' volume-agent | grep -q 'install ok installed' || fail "volume-agent not installed"
for f in /usr/bin/volume-agent /usr/lib/systemd/system/volume-agent.service \
	/usr/lib/tmpfiles.d/volume-agent.conf /etc/volume-agent/config.toml \
	/usr/share/man/man1/volume-agent.1.gz /usr/share/bash-completion/completions/volume-agent \
	/usr/share/zsh/vendor-completions/_volume-agent /usr/share/fish/vendor_completions.d/volume-agent.fish \
	/usr/share/doc/volume-agent/copyright /usr/share/volume-agent/resource-types/README \
	/usr/share/volume-agent/monitoring/volume-fleet.dashboard.json \
	/usr/share/volume-agent/monitoring/volume-agent.rules.yml \
	/usr/share/volume-agent/monitoring/volume-central.rules.yml; do
	expect_file "$f"
done
dpkg-query -W -f='${Conffiles}\n' volume-agent | grep -q '/etc/volume-agent/config.toml' ||
	fail "config.toml is not a conffile"
# Enabled (symlink written by deb-systemd-helper) though not started: no systemd runs here.
expect_file /etc/systemd/system/multi-user.target.wants/volume-agent.service
# The tmpfiles fragment made the state directories.
[[ $(stat -c %a /var/lib/volume-agent/state) == 700 ]] || fail "/var/lib/volume-agent/state is not 0700"
[[ -d /var/lib/volume-agent/volumes ]] || fail "/var/lib/volume-agent/volumes missing"
/usr/bin/volume-agent --help >/dev/null
systemd-analyze verify /usr/lib/systemd/system/volume-agent.service
zcat /usr/share/man/man1/volume-agent.1.gz | grep -q '^\.TH volume-agent 1' || fail "volume-agent.1.gz is not a man page"

step "deb: upgrade keeps a changed config"
echo '# changed by the operator' >>/etc/volume-agent/config.toml
dpkg -i "$deb"
grep -q '^# changed by the operator' /etc/volume-agent/config.toml || fail "reinstall overwrote the changed config"

step "deb: remove keeps the configuration"
touch /var/lib/volume-agent/volumes/left-by-a-build
dpkg -r volume-agent
expect_gone /usr/bin/volume-agent
expect_gone /usr/lib/systemd/system/volume-agent.service
expect_gone /etc/systemd/system/multi-user.target.wants/volume-agent.service
expect_file /etc/volume-agent/config.toml
grep -q '^# changed by the operator' /etc/volume-agent/config.toml || fail "remove changed the config"
expect_file /var/lib/volume-agent/volumes/left-by-a-build

step "deb: purge removes configuration and state"
dpkg -P volume-agent
expect_gone /etc/volume-agent
expect_gone /var/lib/volume-agent
if dpkg-query -W volume-agent >/dev/null 2>&1; then fail "volume-agent still known to dpkg after purge"; fi

# ---- volume-central ------------------------------------------------------------------
cdeb=$(ls target/packages/volume-central_*.deb)
crpm=$(ls target/packages/volume-central-[0-9]*.rpm)
cbin=${CARGO_TARGET_DIR:-target}/release/volume-central

verify_unit volume-central "$cbin"
lint volume-central "$cdeb" "$crpm"
check_rpm volume-central "$crpm" /etc/volume-central/volume-central.toml \
	'systemd-sysusers volume-central.conf' \
	/usr/lib/sysusers.d/volume-central.conf /usr/share/man/man1/volume-central-run.1.gz \
	/usr/share/doc/volume-central/README.md

step "volume-central: deb install (the system user made, the unit known but not enabled)"
dpkg -i "$cdeb"
dpkg-query -W -f='${Status}\n' volume-central | grep -q 'install ok installed' || fail "volume-central not installed"
for f in /usr/bin/volume-central /usr/lib/systemd/system/volume-central.service \
	/usr/lib/sysusers.d/volume-central.conf /etc/volume-central/volume-central.toml \
	/usr/share/man/man1/volume-central.1.gz /usr/share/doc/volume-central/copyright \
	/usr/share/volume-central/monitoring/volume-fleet.dashboard.json \
	/usr/share/volume-central/monitoring/volume-agent.rules.yml \
	/usr/share/volume-central/monitoring/volume-central.rules.yml; do
	expect_file "$f"
done
dpkg-query -W -f='${Conffiles}\n' volume-central | grep -q '/etc/volume-central/volume-central.toml' ||
	fail "volume-central.toml is not a conffile"
getent passwd volume-central >/dev/null || fail "the postinst made no system user volume-central"
expect_gone /etc/systemd/system/multi-user.target.wants/volume-central.service
systemd-analyze verify /usr/lib/systemd/system/volume-central.service
zcat /usr/share/man/man1/volume-central.1.gz | grep -q '^\.TH volume-central 1' || fail "volume-central.1.gz is not a man page"
# The packaged config is valid as shipped: it gets as far as the database (which has no
# role for it here), not a configuration error (exit 78).
rc=0
/usr/bin/volume-central credentials list --config /etc/volume-central/volume-central.toml >"$scratch/clist.out" 2>&1 || rc=$?
[[ $rc == 1 ]] && grep -q 'database' "$scratch/clist.out" ||
	fail "the packaged volume-central.toml is refused (exit $rc): $(cat "$scratch/clist.out")"

step "volume-central: deb upgrade keeps a changed config; remove keeps it; purge removes it"
echo '# changed by the operator' >>/etc/volume-central/volume-central.toml
dpkg -i "$cdeb"
grep -q '^# changed by the operator' /etc/volume-central/volume-central.toml || fail "reinstall overwrote the changed config"
dpkg -r volume-central
expect_gone /usr/bin/volume-central
expect_file /etc/volume-central/volume-central.toml
dpkg -P volume-central
expect_gone /etc/volume-central
if dpkg-query -W volume-central >/dev/null 2>&1; then fail "volume-central still known to dpkg after purge"; fi

step "ok"
