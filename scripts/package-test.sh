#!/usr/bin/env bash
# make package-test: the .debs of `make package` installed, upgraded and
# purged in a clean Debian root (mmdebstrap, bookworm minbase with systemd),
# as dpkg on a node or an image builder would, in a chroot:
#   install  -> the service users exist (vkx-guest in tss), the units are
#               there and disabled, /etc/vkx holds the conffiles, the
#               binaries run, man pages and completions are in place;
#   state    -> a node's state is made (/var/lib/vkx: a key store file, a
#               registry entry, a vTPM authorisation), host.toml is edited
#               and vkx-host.service enabled, as an operator would;
#   upgrade  -> to <version>-2: the edit and the enablement are kept, the
#               state is byte for byte the same;
#   purge    -> binaries, units, conffiles and the enablement are gone, the
#               state is untouched, and nothing else the packages wrote is
#               left (file lists before and after, minus the allowed list
#               below).
# The root is cached in target/pkgroot/, keyed by the package list: the first
# run downloads about 60 MB (about 1 min), later runs unpack the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
# What a node or an image has before our packages: systemd, and what their
# Depends name (so dpkg -i needs no network).
INCLUDE=systemd,tpm-udev,libtss2-esys-3.0.2-0,libtss2-mu0,libtss2-tctildr0,libtss2-tcti-device0

fail() { echo "package-test: FAIL: $*" >&2; exit 1; }
ok() { echo "  ok  $*"; }

command -v mmdebstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
debs=target/debian
for p in vkx-host vkx-guest; do
    [ -f "$debs/${p}_${version}-1_amd64.deb" ] || fail "$debs/${p}_${version}-1_amd64.deb missing: make package"
done
work=$(mktemp -d /tmp/vkx-package-test.XXXXXX)
trap 'rm -rf "$work"' EXIT
# The packages under test, then the upgrade: the same build as revision 2
# (cargo-deb empties target/debian, its staging directory, as it builds).
cp "$debs/vkx-host_${version}-1_amd64.deb" "$debs/vkx-guest_${version}-1_amd64.deb" "$work/"
up="$work/upgrade"
mkdir -p "$up"
for p in vkx-host vkx-guest; do
    "$CARGO" deb --locked --no-build -p "$p" --deb-revision 2 --output "$up/" 2>&1 \
        | grep -v 'Duplicate assets' >/dev/null || true
    [ -f "$up/${p}_${version}-2_amd64.deb" ] || fail "cargo deb --deb-revision 2 -p $p"
done
cp "$work"/*.deb "$debs/"

cache=target/pkgroot
key=$(echo "$SUITE $INCLUDE" | sha256sum | cut -c1-16)
tarball="$cache/$SUITE-$key.tar"
if [ ! -f "$tarball" ]; then
    mkdir -p "$cache"
    echo "package-test: building the clean root ($SUITE, minbase + $INCLUDE)"
    mmdebstrap --quiet --format=tar --variant=minbase --include="$INCLUDE" "$SUITE" "$tarball.tmp" "$MIRROR"
    mv "$tarball.tmp" "$tarball"
fi
root="$work/root"
mkdir "$root"
tar -C "$root" -xf "$tarball"
inroot() { chroot "$root" "$@"; }
# Every file, with type, mode, owner and checksum, outside the volatile
# dpkg/apt/log databases.
snapshot() {
    (cd "$root" && find . -xdev \( -path ./var/lib/dpkg -o -path ./var/log -o -path ./var/cache \
        -o -path ./var/lib/apt -o -path ./tmp -o -path ./proc \) -prune -o -printf '%y %m %u %g %p\n' \
        | sort) >"$1"
}
snapshot "$work/before"

echo "package-test: install"
cp "$work/vkx-host_${version}-1_amd64.deb" "$work/vkx-guest_${version}-1_amd64.deb" "$root/tmp/"
inroot dpkg -i "/tmp/vkx-host_${version}-1_amd64.deb" "/tmp/vkx-guest_${version}-1_amd64.deb" >"$work/install.log" 2>&1 \
    || { cat "$work/install.log"; fail "dpkg -i"; }
inroot getent passwd vkx-host >/dev/null || fail "no user vkx-host"
inroot id -nG vkx-guest | grep -qw tss || fail "vkx-guest is not in tss"
for u in vkx-host vkx-guest vkx-guest-once; do
    [ "$(inroot systemctl is-enabled $u 2>/dev/null || true)" = disabled ] || fail "$u.service is not installed disabled"
done
ok "users vkx-host and vkx-guest (in tss); vkx-host, vkx-guest, vkx-guest-once.service installed disabled"
for f in /etc/vkx/host.toml /etc/vkx/policy.toml /etc/vkx/guest.toml; do
    cat "$root"/var/lib/dpkg/info/vkx-*.conffiles | grep -qx "$f" || fail "$f is not a conffile"
done
inroot vkx-host version | grep -q "vkx-host $version" || fail "vkx-host does not run"
inroot vkx-guest version | grep -q "vkx-guest $version" || fail "vkx-guest does not run"
[ -f "$root/usr/share/man/man1/vkx-host-keys-rotate.1.gz" ] || fail "no man page vkx-host-keys-rotate"
[ -f "$root/usr/share/bash-completion/completions/vkx-guest" ] || fail "no bash completion"
ok "conffiles in /etc/vkx; binaries run; man pages and completions installed"

echo "package-test: a node's state, an operator's edit"
mkdir -p "$root/var/lib/vkx/node/keys/disk" "$root/var/lib/vkx/registry/vtpm-auth"
head -c 64 /dev/urandom >"$root/var/lib/vkx/node/master.key"
head -c 200 /dev/urandom >"$root/var/lib/vkx/node/keys/disk/1.key"
echo '{"vm_id":"vm-17"}' >"$root/var/lib/vkx/registry/vm-17.json"
head -c 100 /dev/urandom >"$root/var/lib/vkx/registry/vtpm-auth/vm-17.secrets"
inroot chown -R vkx-host:vkx-host /var/lib/vkx
chmod -R go-rwx "$root/var/lib/vkx"
state() { (cd "$root/var/lib/vkx" && find . -printf '%y %m %u %g %p\n' | sort && find . -type f -exec sha256sum {} + | sort); }
state >"$work/state-0"
echo "# edited by the operator" >>"$root/etc/vkx/host.toml"
inroot systemctl enable vkx-host.service >/dev/null 2>&1 || fail "systemctl enable"

echo "package-test: upgrade to ${version}-2"
cp "$up/vkx-host_${version}-2_amd64.deb" "$up/vkx-guest_${version}-2_amd64.deb" "$root/tmp/"
inroot dpkg -i "/tmp/vkx-host_${version}-2_amd64.deb" "/tmp/vkx-guest_${version}-2_amd64.deb" >"$work/upgrade.log" 2>&1 \
    || { cat "$work/upgrade.log"; fail "dpkg -i (upgrade)"; }
inroot dpkg-query -W -f='${Version}' vkx-host | grep -qx "${version}-2" || fail "not upgraded"
grep -q "edited by the operator" "$root/etc/vkx/host.toml" || fail "the upgrade lost the operator's host.toml edit"
[ "$(inroot systemctl is-enabled vkx-host 2>/dev/null)" = enabled ] || fail "the upgrade disabled vkx-host.service"
state >"$work/state-1"
cmp -s "$work/state-0" "$work/state-1" || { diff "$work/state-0" "$work/state-1"; fail "the upgrade changed /var/lib/vkx"; }
ok "host.toml edit and enablement kept; /var/lib/vkx byte for byte the same"

echo "package-test: purge"
inroot dpkg --purge vkx-host vkx-guest >"$work/purge.log" 2>&1 || { cat "$work/purge.log"; fail "dpkg --purge"; }
for f in /usr/bin/vkx-host /usr/bin/vkx-guest /etc/vkx/host.toml /etc/vkx/guest.toml \
    /usr/lib/systemd/system/vkx-host.service /etc/systemd/system/multi-user.target.wants/vkx-host.service; do
    [ ! -e "$root$f" ] || fail "$f is left after purge"
done
state >"$work/state-2"
cmp -s "$work/state-0" "$work/state-2" || { diff "$work/state-0" "$work/state-2"; fail "the purge changed /var/lib/vkx"; }
rm -rf "$root/var/lib/vkx"
snapshot "$work/after"
# Left on purpose: the service users (Debian leaves system users; their
# files would otherwise change owner), and systemd's record of them.
stray=$(diff "$work/before" "$work/after" | grep '^[<>]' \
    | grep -vE ' \./etc/(passwd|group|shadow|gshadow)-?$' || true)
[ -z "$stray" ] || { echo "$stray"; fail "the packages left files behind after purge"; }
ok "nothing of the packages left but their users; /var/lib/vkx untouched"
echo "package-test: PASS"
