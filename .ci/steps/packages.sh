#!/usr/bin/env bash
# CI step: build the .deb and .rpm, lint them, verify the systemd unit, and install,
# remove and purge the .deb on this machine (and install the .rpm into a scratch root).
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
if dpkg-query -W -f='${Status}' volume-agent 2>/dev/null | grep -q installed; then
	step "purging a volume-agent package left from an earlier run"
	dpkg -P volume-agent
fi

step "build"
bash packaging/build.sh
deb=$(ls target/packages/volume-agent_*.deb)
rpm=$(ls target/packages/volume-agent-*.rpm)
bin=${CARGO_TARGET_DIR:-target}/release/volume-agent

step "the packaged config: refused with its placeholder, accepted (every key) once named"
if "$bin" config check --config packaging/config.toml >"$scratch/check.out" 2>&1; then
	fail "volume-agent accepted the packaged config with worker_name still the placeholder"
fi
grep -q worker_name "$scratch/check.out" || fail "the refusal does not name worker_name: $(cat "$scratch/check.out")"
sed 's/^worker_name = .*/worker_name = "ci-worker"/' packaging/config.toml >"$scratch/config.toml"
"$bin" config check --config "$scratch/config.toml" >/dev/null

step "systemd-analyze verify (copy of the unit with ExecStart on the built binary)"
# verify checks that ExecStart's binary exists, so the packaged unit (/usr/bin/...) is
# verified against a copy that runs the freshly built binary instead; the man page it
# names is not installed yet, hence --man=no. After dpkg -i the installed unit is
# verified again as shipped, binary and man page included.
sed "s|^ExecStart=/usr/bin/volume-agent |ExecStart=$(realpath "$bin") |" \
	systemd/volume-agent.service >"$scratch/volume-agent.service"
grep -q "^ExecStart=$(realpath "$bin") run " "$scratch/volume-agent.service" || fail "ExecStart not rewritten"
systemd-analyze verify --man=no "$scratch/volume-agent.service"
systemd-analyze security --offline=yes "$scratch/volume-agent.service" | tail -n 1

step "lintian (errors fail; warnings are printed)"
lintian --fail-on error --info "$deb"

step "rpmlint (errors fail)"
rpmlint -c packaging/rpm/rpmlint.toml "$rpm"

step "rpm: contents and scriptlets"
rpm -qip "$rpm"
rpm -qlp "$rpm" | tee "$scratch/rpm-files"
for f in /usr/bin/volume-agent /usr/lib/systemd/system/volume-agent.service \
	/usr/lib/tmpfiles.d/volume-agent.conf /etc/volume-agent/config.toml \
	/usr/share/man/man1/volume-agent.1.gz /usr/share/bash-completion/completions/volume-agent \
	/usr/share/zsh/site-functions/_volume-agent /usr/share/fish/vendor_completions.d/volume-agent.fish \
	/usr/share/licenses/volume-agent/LICENSE /usr/share/volume-agent/resource-types/README; do
	grep -qx "$f" "$scratch/rpm-files" || fail "$f missing from the rpm"
done
rpm -qp --configfiles "$rpm" | grep -qx /etc/volume-agent/config.toml || fail "config.toml is not %config in the rpm"
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpm" | grep -q '^cn /etc/volume-agent/config.toml$' ||
	fail "config.toml is not %config(noreplace) in the rpm"
rpm -qp --scripts "$rpm" | tee "$scratch/rpm-scripts"
for s in postinstall preuninstall postuninstall; do
	grep -q "^$s scriptlet" "$scratch/rpm-scripts" || fail "rpm has no $s scriptlet"
done
grep -q 'systemctl --no-reload preset volume-agent.service' "$scratch/rpm-scripts" || fail "%post does not preset the unit"

step "rpm: install into a scratch root, scriptlets included"
# The scratch root gets a /bin/sh (dash and the libraries it links) so rpm can run the
# scriptlets inside it. systemctl and systemd-tmpfiles are absent there, as on a minimal
# image: the scriptlets must skip what they cannot do and exit 0.
rpmroot=$scratch/rpmroot
mkdir -p "$rpmroot/bin"
cp "$(command -v dash)" "$rpmroot/bin/sh"
for lib in $(ldd "$(command -v dash)" | grep -o '/[^ ]*'); do
	mkdir -p "$rpmroot$(dirname "$lib")"
	cp "$lib" "$rpmroot$lib"
done
rpm --root "$rpmroot" --initdb
rpm --root "$rpmroot" --nodeps -i "$rpm" 2>&1 | tee "$scratch/rpm-install.log"
if grep -q 'scriptlet failed' "$scratch/rpm-install.log"; then fail "an rpm scriptlet failed"; fi
rpm --root "$rpmroot" -q volume-agent
rpm --root "$rpmroot" -V --nodeps volume-agent || fail "rpm -V: installed files differ from the package"
for f in /usr/bin/volume-agent /usr/lib/systemd/system/volume-agent.service /etc/volume-agent/config.toml; do
	expect_file "$rpmroot$f"
done
"$rpmroot/usr/bin/volume-agent" --help >/dev/null
echo '# changed by the operator' >>"$rpmroot/etc/volume-agent/config.toml"
rpm --root "$rpmroot" --nodeps -e volume-agent 2>&1 | tee "$scratch/rpm-erase.log"
if grep -q 'scriptlet failed' "$scratch/rpm-erase.log"; then fail "an rpm scriptlet failed on erase"; fi
expect_gone "$rpmroot/usr/bin/volume-agent"
# %config(noreplace): a changed config survives erase as .rpmsave.
expect_file "$rpmroot/etc/volume-agent/config.toml.rpmsave"

step "deb: install"
dpkg -i "$deb"
dpkg-query -W -f='${Status}\n' volume-agent | grep -q 'install ok installed' || fail "volume-agent not installed"
for f in /usr/bin/volume-agent /usr/lib/systemd/system/volume-agent.service \
	/usr/lib/tmpfiles.d/volume-agent.conf /etc/volume-agent/config.toml \
	/usr/share/man/man1/volume-agent.1.gz /usr/share/bash-completion/completions/volume-agent \
	/usr/share/zsh/vendor-completions/_volume-agent /usr/share/fish/vendor_completions.d/volume-agent.fish \
	/usr/share/doc/volume-agent/copyright /usr/share/volume-agent/resource-types/README; do
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

step "ok"
