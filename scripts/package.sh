#!/usr/bin/env bash
# make package: vkx-host_*.deb and vkx-guest_*.deb in $TARGET/debian/.
#
# 1. release binaries of both agents;
# 2. per package, into $TARGET/release/package/<pkg>/: the man pages (one per
#    command, from the CLI definitions: `<bin> manpages`), the bash, zsh and
#    fish completions (`<bin> completions`), and the copyright text with every
#    linked crate and its licence (scripts/deb-copyright.py);
# 3. cargo-deb, from [package.metadata.deb] in host/ and guest/Cargo.toml
#    (binaries, units, sysusers files, /etc/vkx conffiles, examples);
# 4. lintian on both: an error or warning fails the build; each override
#    (host/debian, guest/debian lintian-overrides) carries its reason.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
TARGET=${CARGO_TARGET_DIR:-target}

"$CARGO" build --release --locked --bins -p vkx-host -p vkx-guest
mkdir -p "$TARGET/debian"
for pkg in vkx-host vkx-guest; do
    out="$TARGET/release/package/$pkg"
    rm -rf "$out"
    mkdir -p "$out/man" "$out/completions"
    bin="$TARGET/release/$pkg"
    "$bin" manpages --out "$out/man"
    gzip -9n "$out"/man/*.1
    "$bin" completions bash >"$out/completions/$pkg"
    "$bin" completions zsh >"$out/completions/_$pkg"
    "$bin" completions fish >"$out/completions/$pkg.fish"
    python3 scripts/deb-copyright.py "$pkg" "$out/copyright"
    "$CARGO" deb --locked --no-build -p "$pkg" --output "$TARGET/debian/"
done
ls -l "$TARGET"/debian/*.deb
# Errors and warnings fail the build; the overrides in */debian/lintian-overrides
# say why each one they silence is right for these packages.
lintian --fail-on error,warning "$TARGET"/debian/vkx-host_*.deb "$TARGET"/debian/vkx-guest_*.deb
echo "make package: lintian clean (errors and warnings)"
