#!/usr/bin/env bash
# Builds the .deb and .rpm of volume-agent and of volume-central into target/packages/.
#
#   bash packaging/build.sh [volume-agent] [volume-central]    (both when none is named)
#
# For each product:
# 1. installs cargo-deb and cargo-generate-rpm (cargo install --locked) when missing;
# 2. builds the release binary;
# 3. runs the built binary's hidden `generate` subcommands for man pages (and, for the
#    agent, shell completions) into target/packages/staging/PRODUCT/, so they always
#    describe the CLI that ships;
# 4. cargo deb (strips the binary, gzips the man pages) and cargo generate-rpm (from a
#    stripped copy and gzipped man pages made here: it does neither itself).
# Set PACKAGES_SKIP_BUILD=1 to reuse existing release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }
die() {
	printf 'packaging/build.sh: %s\n' "$*" >&2
	exit 1
}

products=("$@")
((${#products[@]})) || products=(volume-agent volume-central)
for product in "${products[@]}"; do
	case $product in
	volume-agent | volume-central) ;;
	*) die "unknown product $product: name volume-agent and/or volume-central" ;;
	esac
done

for tool in cargo-deb:cargo-deb cargo-generate-rpm:cargo-generate-rpm; do
	bin=${tool%%:*} crate=${tool##*:}
	if ! command -v "$bin" >/dev/null 2>&1; then
		say "installing $crate (cargo install --locked)"
		cargo install --locked "$crate"
	fi
done
command -v strip >/dev/null || die "strip is missing: apt-get install binutils"

target_dir=${CARGO_TARGET_DIR:-target}
out=target/packages

if [[ ${PACKAGES_SKIP_BUILD:-} != 1 ]]; then
	build_args=()
	for product in "${products[@]}"; do build_args+=(-p "$product"); done
	say "cargo build --release ${build_args[*]}"
	cargo build --release --locked "${build_args[@]}"
fi

# package PRODUCT DIR: DIR is the product's crate directory (cargo generate-rpm -p DIR).
package() {
	local product=$1 dir=$2
	local bin=$target_dir/release/$product staging=$out/staging/$product
	[[ -x $bin ]] || die "$bin does not exist: build it with cargo build --release -p $product"

	rm -rf "$staging"
	mkdir -p "$staging/bin" "$staging/man" "$staging/man-gz"
	say "$product: man pages from $bin generate manpages"
	"$bin" generate manpages "$staging/man" ||
		die "\`$bin generate manpages DIR\` failed; the packages need the man pages it writes"
	[[ -s $staging/man/$product.1 ]] || die "generate manpages wrote no $product.1 into $staging/man"
	if [[ $product == volume-agent ]]; then
		mkdir -p "$staging/completions"
		"$bin" generate completions "$staging/completions" ||
			die "\`$bin generate completions DIR\` failed; the packages need its output"
		for f in volume-agent.bash _volume-agent volume-agent.fish; do
			[[ -s $staging/completions/$f ]] || die "generate completions wrote no $f into $staging/completions"
		done
	fi

	# For the rpm, which has no brp-compress/brp-strip here.
	for page in "$staging"/man/*.1; do
		gzip -9n <"$page" >"$staging/man-gz/$(basename "$page").gz"
	done
	strip --strip-unneeded -o "$staging/bin/$product" "$bin"

	rm -f "$out/${product}"_*.deb "$out/${product}"-[0-9]*.rpm
	say "$product: cargo deb"
	cargo deb -p "$product" --no-build --strip --output "$out/"
	say "$product: cargo generate-rpm"
	cargo generate-rpm -p "$dir" --output "$out/"
}

mkdir -p "$out"
for product in "${products[@]}"; do
	case $product in
	volume-agent) package volume-agent agent ;;
	volume-central) package volume-central central ;;
	esac
done

say "packages:"
ls -l "$out"/*.deb "$out"/*.rpm
