#!/usr/bin/env bash
# Builds the volume-agent .deb and .rpm into target/packages/.
#
#   bash packaging/build.sh
#
# 1. installs cargo-deb and cargo-generate-rpm (cargo install --locked) when missing;
# 2. builds the release binary;
# 3. runs the built binary's hidden `generate` subcommands for man pages and shell
#    completions, so they always describe the CLI that ships;
# 4. cargo deb (strips the binary, gzips the man pages) and cargo generate-rpm (from a
#    stripped copy and gzipped man pages made here: it does neither itself).
# Set PACKAGES_SKIP_BUILD=1 to reuse an existing release binary.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }
die() {
	printf 'packaging/build.sh: %s\n' "$*" >&2
	exit 1
}

for tool in cargo-deb:cargo-deb cargo-generate-rpm:cargo-generate-rpm; do
	bin=${tool%%:*} crate=${tool##*:}
	if ! command -v "$bin" >/dev/null 2>&1; then
		say "installing $crate (cargo install --locked)"
		cargo install --locked "$crate"
	fi
done
command -v strip >/dev/null || die "strip is missing: apt-get install binutils"

target_dir=${CARGO_TARGET_DIR:-target}
bin="$target_dir/release/volume-agent"
out=target/packages
staging=$out/staging

if [[ ${PACKAGES_SKIP_BUILD:-} != 1 ]]; then
	say "cargo build --release -p volume-agent"
	cargo build --release --locked -p volume-agent
fi
[[ -x $bin ]] || die "$bin does not exist: build it with cargo build --release -p volume-agent"

rm -rf "$staging"
mkdir -p "$staging/man" "$staging/man-gz" "$staging/completions"

say "man pages and completions from $bin generate"
if ! "$bin" generate manpages "$staging/man" || ! "$bin" generate completions "$staging/completions"; then
	die "\`$bin generate manpages DIR\` / \`generate completions DIR\` failed. The CLI must
expose the hidden subcommands that call volume_agent::generate::write_manpages(cmd, DIR)
and write_completions(cmd, \"volume-agent\", DIR); the packages need their output."
fi
[[ -s $staging/man/volume-agent.1 ]] || die "generate manpages wrote no volume-agent.1 into $staging/man"
for f in volume-agent.bash _volume-agent volume-agent.fish; do
	[[ -s $staging/completions/$f ]] || die "generate completions wrote no $f into $staging/completions"
done

# For the rpm, which has no brp-compress/brp-strip here.
for page in "$staging"/man/*.1; do
	gzip -9n <"$page" >"$staging/man-gz/$(basename "$page").gz"
done
strip --strip-unneeded -o "$staging/volume-agent" "$bin"

rm -f "$out"/*.deb "$out"/*.rpm
say "cargo deb"
cargo deb -p volume-agent --no-build --strip --output "$out/"
say "cargo generate-rpm"
cargo generate-rpm -p agent --output "$out/"

say "packages:"
ls -l "$out"/*.deb "$out"/*.rpm
