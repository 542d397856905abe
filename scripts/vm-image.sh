#!/usr/bin/env bash
# make vm-test, part 1: the guest image, built from Debian's packages as an
# image builder would, without mounting anything (the build machines have no
# device-mapper, and tests do not rely on loop mounts):
#   base     -> a bookworm rootfs (mmdebstrap minbase + systemd, udev,
#               cryptsetup, Debian's kernel (less the drivers of hardware a
#               VM never has) and its initramfs-tools initrd,
#               systemd-stub, the TSS libraries vkx-guest's package names);
#               cached as a tar keyed by that package list;
#   root     -> the base with the vkx-guest .deb installed by `dpkg -i` in a
#               chroot, its units enabled, crypttab/fstab for the data volume,
#               vsock loaded by systemd-modules-load, and the test's report
#               unit (vmtest/, not part of the product); an ext4 made with
#               `mkfs.ext4 -d`, cached keyed by base + .deb + those files;
#   data     -> the LUKS2 data volume: an ext4 holding a known file
#               (`mkfs.ext4 -d`), encrypted offline in place (`cryptsetup
#               reencrypt --encrypt`, no device-mapper needed) under a 64-byte
#               random key file that the test stores as the vkx key `disk`;
#               cached keyed by its inputs;
#   uki      -> a unified kernel image (systemd-stub 252 + .osrel, .cmdline,
#               .linux, .initrd, assembled with objcopy as systemd documents
#               for 252, which has no ukify) on a GPT disk's EFI system
#               partition as \EFI\BOOT\BOOTX64.EFI, for OVMF; per command line.
# Usage: scripts/vm-image.sh base|root|data            (cached steps)
#        scripts/vm-image.sh uki OUT_DIR "CMDLINE" [EXTRA_INITRD_FILE]
#        scripts/vm-image.sh expected-pcr11 OUT_DIR    (what the stub will measure)
# Everything lands in target/vm/ (VM_DIR); the first run downloads about
# 150 MB of packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VM_DIR=${VM_DIR:-target/vm}
CACHE=$VM_DIR/cache
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
# What the image holds before vkx: PID 1 and udev, cryptsetup (crypttab is
# opened by systemd-cryptsetup), Debian's kernel with initramfs-tools,
# systemd-boot-efi for the stub, and what the vkx-guest package Depends on
# (so dpkg -i needs no network).
# The kernel is linux-image-amd64, not the smaller -cloud-amd64: bookworm's
# cloud kernel is built without CONFIG_VMGENID, so a guest on it never
# learns that it was restored from a snapshot (its kernel log never gets the
# VM-fork record vkx-guest watches for). The generic kernel has VMGENID=y,
# TPM TIS/CRB built in, and virtio, vsock and ext4 as modules.
INCLUDE=systemd,systemd-sysv,udev,kmod,e2fsprogs,cryptsetup,linux-image-amd64,initramfs-tools,systemd-boot-efi,tpm-udev,libtss2-esys-3.0.2-0,libtss2-mu0,libtss2-tctildr0,libtss2-tcti-device0
# The generic kernel's modules are 389 MiB; these trees drive hardware a
# virtio VM never has (GPUs, NICs but virtio's, Wi-Fi, sound, media, RDMA,
# staging), so dpkg does not unpack them (about 150 MiB less).
TRIM="drivers/gpu drivers/net/ethernet drivers/net/wireless drivers/media drivers/infiniband drivers/staging drivers/bluetooth drivers/iio sound net/wireless net/mac80211 net/bluetooth"
# The initrd's modules: just what mounts the root file system (virtio-blk,
# ext4; their dependencies follow), not MODULES=most's hundreds.
INITRD_MODULES="virtio_pci virtio_blk ext4"
# Fixed identities, so that the command line (hence PCR 11) and crypttab are
# known before the image is built.
ROOT_UUID=6b1f0c1e-7a2d-4c55-9a1e-0d5e7f3a9b01
DATA_LUKS_UUID=3c9a4f62-51e8-4d0b-8f7e-2b6d1c0e9a77
MACHINE_ID=8d2f6c3a1b9e4f7a9c0d5e6f7a8b9c0d
KNOWN_TEXT="vkx vm-test: this file lives on the LUKS2 volume unlocked with the vkx key 'disk'"

fail() { echo "vm-image: FAIL: $*" >&2; exit 1; }
say() { echo "vm-image: $*"; }
key_of() { sha256sum | cut -c1-16; }

base_key() { echo "$SUITE $INCLUDE $TRIM $INITRD_MODULES" | key_of; }
base_tar() { echo "$CACHE/base-$(base_key).tar"; }

cmd_base() {
    local tar
    tar=$(base_tar)
    [ -f "$tar" ] && { say "base: cached $(basename "$tar")"; return; }
    mkdir -p "$CACHE"
    say "base: mmdebstrap $SUITE minbase + $INCLUDE"
    local excludes=() t
    for t in $TRIM; do excludes+=("--dpkgopt=path-exclude=/lib/modules/*/kernel/$t/*"); done
    # MODULES=list: the initrd holds INITRD_MODULES and their dependencies.
    mmdebstrap --quiet --format=tar --variant=minbase --include="$INCLUDE" "${excludes[@]}" \
        --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"; echo MODULES=list > "$1/etc/initramfs-tools/conf.d/vkx.conf"; printf "%s\n" '"$INITRD_MODULES"' > "$1/etc/initramfs-tools/modules"' \
        --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages' \
        "$SUITE" "$tar.tmp" "$MIRROR"
    mv "$tar.tmp" "$tar"
    say "base: $(du -h "$tar" | cut -f1)"
}

guest_deb() {
    local version
    version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
    echo "target/debian/vkx-guest_${version}-1_amd64.deb"
}

root_key() {
    { base_key; sha256sum "$(guest_deb)" | cut -d' ' -f1; cat "$0" scripts/vmtest/*; } | key_of
}

# The image's own files: everything an image builder adds besides the
# package (the per-VM pin and AK authorisation come later, per VM).
customize_root() {
    local root=$1
    echo vkx-vm >"$root/etc/hostname"
    echo "$MACHINE_ID" >"$root/etc/machine-id"
    # The vsock transport before vkx-guest-once (After=systemd-modules-load).
    echo vmw_vsock_virtio_transport >"$root/etc/modules-load.d/vkx-vsock.conf"
    # The data volume: its key is the vkx key 'disk', delivered by
    # vkx-guest-once before cryptsetup-pre.target; headless: never ask for
    # a passphrase on a console nobody watches; nofail: a refused key leaves
    # the volume locked and the boot goes on.
    cat >"$root/etc/crypttab" <<EOF
data UUID=$DATA_LUKS_UUID /run/vkx/keys/disk luks,headless=true,tries=1,nofail
EOF
    cat >"$root/etc/fstab" <<EOF
UUID=$ROOT_UUID / ext4 rw,errors=remount-ro 0 1
/dev/mapper/data /srv/data ext4 nofail,noexec,nodev,nosuid 0 2
EOF
    mkdir -p "$root/srv/data"
    chroot "$root" systemctl enable vkx-guest-once.service vkx-guest.service >/dev/null 2>&1 \
        || fail "systemctl enable the vkx units"
    # The test's report (not part of the product): a unit and its script.
    install -m 0644 scripts/vmtest/vkx-vmtest-report.service "$root/etc/systemd/system/"
    install -m 0755 scripts/vmtest/vkx-vmtest-report "$root/usr/local/sbin/"
    for u in vkx-guest-once vkx-guest; do
        mkdir -p "$root/etc/systemd/system/$u.service.d"
        install -m 0644 scripts/vmtest/console.conf "$root/etc/systemd/system/$u.service.d/vmtest-console.conf"
    done
    chroot "$root" systemctl enable vkx-vmtest-report.service >/dev/null 2>&1 || fail "enable the report unit"
    # No login prompt on the serial console: the test reads it.
    chroot "$root" systemctl mask serial-getty@ttyS0.service getty@tty1.service >/dev/null 2>&1 || true
}

cmd_root() {
    local out key work deb
    deb=$(guest_deb)
    [ -f "$deb" ] || fail "$deb missing: make package"
    key=$(root_key)
    out=$CACHE/root-$key
    [ -f "$out/root.img" ] && { say "root: cached root-$key"; return; }
    cmd_base
    work=$VM_DIR/work-root
    rm -rf "$work" "$out.tmp"
    mkdir -p "$work/root" "$out.tmp"
    say "root: unpack base, dpkg -i $(basename "$deb")"
    tar -C "$work/root" -xf "$(base_tar)"
    cp "$deb" "$work/root/tmp/"
    chroot "$work/root" dpkg -i "/tmp/$(basename "$deb")" >"$work/dpkg.log" 2>&1 \
        || { cat "$work/dpkg.log"; fail "dpkg -i vkx-guest"; }
    rm -f "$work/root/tmp/$(basename "$deb")"
    customize_root "$work/root"
    local kver
    kver=$(ls "$work/root/lib/modules" | head -1)
    [ -n "$kver" ] || fail "no kernel in the base"
    cp "$work/root/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
    cp "$work/root/boot/initrd.img-$kver" "$out.tmp/initrd.img"
    cp "$work/root/usr/lib/os-release" "$out.tmp/os-release"
    cp "$work/root/usr/lib/systemd/boot/efi/linuxx64.efi.stub" "$out.tmp/linuxx64.efi.stub"
    echo "$kver" >"$out.tmp/kernel-version"
    chroot "$work/root" id -u vkx-guest >"$out.tmp/vkx-guest.uid"
    chroot "$work/root" id -g vkx-guest >"$out.tmp/vkx-guest.gid"
    # The root filesystem: its content plus about a third free.
    local mb
    mb=$(($(du -sm "$work/root" | cut -f1) * 4 / 3 + 64))
    mkfs.ext4 -q -F -U "$ROOT_UUID" -L vkx-root -d "$work/root" "$out.tmp/root.img" "${mb}M" \
        || fail "mkfs.ext4 -d"
    rm -rf "$work"
    mv "$out.tmp" "$out"
    # Older root images (another .deb or image file) are not used again.
    find "$CACHE" -maxdepth 1 -name 'root-*' ! -name "root-$key" -exec rm -rf {} +
    say "root: root-$key ($(du -h --apparent-size "$out/root.img" | cut -f1) ext4, kernel $kver)"
}

root_dir() { echo "$CACHE/root-$(root_key)"; }

cmd_data() {
    local key out work
    key=$(echo "$KNOWN_TEXT $DATA_LUKS_UUID" | key_of)
    out=$CACHE/data-$key
    [ -f "$out/data.img" ] && { say "data: cached data-$key"; return; }
    work=$VM_DIR/work-data
    rm -rf "$work" "$out.tmp"
    mkdir -p "$work/fs" "$out.tmp"
    printf '%s\n' "$KNOWN_TEXT" >"$work/fs/known.txt"
    sha256sum "$work/fs/known.txt" | cut -d' ' -f1 >"$out.tmp/known.sha256"
    # 64 MiB: the front 16 MiB take the LUKS2 header, the ext4 is 32 MiB.
    truncate -s 64M "$out.tmp/data.img"
    mkfs.ext4 -q -F -L vkx-data -d "$work/fs" "$out.tmp/data.img" 32M || fail "mkfs.ext4 -d (data)"
    head -c 64 /dev/urandom >"$out.tmp/data.key"
    chmod 600 "$out.tmp/data.key"
    # The key file is 512 random bits: no stretching needed, and Argon2id's
    # memory would not fit a small VM. Offline encryption needs no dm.
    cryptsetup reencrypt --encrypt --type luks2 --reduce-device-size 32M --batch-mode \
        --uuid "$DATA_LUKS_UUID" --key-file "$out.tmp/data.key" \
        --pbkdf pbkdf2 --pbkdf-force-iterations 1000 "$out.tmp/data.img" >"$work/luks.log" 2>&1 \
        || { cat "$work/luks.log"; fail "cryptsetup reencrypt --encrypt"; }
    cryptsetup isLuks --type luks2 "$out.tmp/data.img" || fail "not LUKS2 after encryption"
    rm -rf "$work"
    mv "$out.tmp" "$out"
    say "data: data-$key (LUKS2, $(du -h --apparent-size "$out/data.img" | cut -f1))"
}

data_dir() { echo "$CACHE/data-$(echo "$KNOWN_TEXT $DATA_LUKS_UUID" | key_of)"; }

# uki OUT_DIR CMDLINE [EXTRA]: OUT_DIR/uki.efi, OUT_DIR/esp.img (a GPT disk
# whose only partition is the ESP holding the UKI as the default boot
# path), OUT_DIR/cmdline, OUT_DIR/initrd.img (EXTRA, if given, is a file
# appended to the initrd as one more cpio archive: the tampered initrd).
cmd_uki() {
    local out=$1 cmdline=$2 extra=${3:-} r
    r=$(root_dir)
    [ -f "$r/root.img" ] || fail "no root image: scripts/vm-image.sh root"
    mkdir -p "$out"
    printf '%s' "$cmdline" >"$out/cmdline"
    cp "$r/initrd.img" "$out/initrd.img"
    if [ -n "$extra" ]; then
        local x
        x=$(mktemp -d "$VM_DIR/extra.XXXXXX")
        cp "$extra" "$x/"
        (cd "$x" && basename "$extra" | cpio --quiet -o -H newc) >>"$out/initrd.img"
        rm -rf "$x"
    fi
    # Section addresses as systemd 252's documentation gives them: after the
    # stub's own sections, the kernel at 32 MiB, the initrd at 48 MiB.
    objcopy \
        --add-section .osrel="$r/os-release" --change-section-vma .osrel=0x20000 \
        --add-section .cmdline="$out/cmdline" --change-section-vma .cmdline=0x30000 \
        --add-section .linux="$r/vmlinuz" --change-section-vma .linux=0x2000000 \
        --add-section .initrd="$out/initrd.img" --change-section-vma .initrd=0x3000000 \
        "$r/linuxx64.efi.stub" "$out/uki.efi" || fail "objcopy (UKI)"
    # The ESP: FAT, the UKI as \EFI\BOOT\BOOTX64.EFI, inside a GPT disk.
    local mb
    mb=$(($(du -m "$out/uki.efi" | cut -f1) + 16))
    rm -f "$out/esp.part" "$out/esp.img"
    mkfs.vfat -C -n VKXESP "$out/esp.part" $((mb * 1024)) >/dev/null || fail "mkfs.vfat"
    mmd -i "$out/esp.part" ::/EFI ::/EFI/BOOT
    mcopy -i "$out/esp.part" "$out/uki.efi" ::/EFI/BOOT/BOOTX64.EFI || fail "mcopy"
    truncate -s $(((mb + 2) * 1024 * 1024)) "$out/esp.img"
    echo 'label: gpt
start=2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="ESP"' \
        | sfdisk --quiet "$out/esp.img" >/dev/null || fail "sfdisk"
    dd if="$out/esp.part" of="$out/esp.img" bs=1M seek=1 conv=notrunc,sparse status=none
    rm -f "$out/esp.part"
}

# What systemd-stub 252 extends into PCR 11 for OUT_DIR's UKI (sha256),
# before any systemd-pcrphase extension, and after its "sysinit" and
# "ready" phases (the ones a boot through initramfs-tools reaches).
cmd_expected_pcr11() {
    local out=$1 r
    r=$(root_dir)
    local args=(--linux="$r/vmlinuz" --osrel="$r/os-release" --cmdline="$out/cmdline" --initrd="$out/initrd.img" --bank=sha256)
    for phase in "" sysinit sysinit:ready; do
        /usr/lib/systemd/systemd-measure calculate "${args[@]}" --phase="$phase" \
            2>/dev/null | sed -n 's/^ *11:sha256=\([0-9a-f]*\)$/\1/p' | head -1
    done
}

case "${1:-}" in
base) cmd_base ;;
root) cmd_root ;;
data) cmd_data ;;
uki) shift; cmd_uki "$@" ;;
expected-pcr11) shift; cmd_expected_pcr11 "$@" ;;
root-dir) root_dir ;;
data-dir) data_dir ;;
*) fail "usage: $0 base|root|data|uki OUT CMDLINE [EXTRA]|expected-pcr11 OUT" ;;
esac
