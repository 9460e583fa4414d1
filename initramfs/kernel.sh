#!/bin/sh
# Fetch the guest kernel for CBox into out/vmlinuz (+ its modules under build/).
#
#   initramfs/kernel.sh [OUT_DIR] [BUILD_DIR]
#
# Default: Debian's cloud kernel.  `apt-get download linux-image-cloud-amd64`
# (a meta package) names the versioned linux-image-<release>-cloud-amd64
# package, which is downloaded too and unpacked with dpkg-deb -x into
# BUILD_DIR/kernel/ (nothing is installed on the host).  Uses the host's own
# apt configuration; run `apt-get update` first if the download fails.
#
# With KERNEL=/path/to/vmlinux-or-bzImage (env) that kernel is used instead;
# KERNEL_MODULES=/path/to/lib/modules/<release> (env, optional) names its
# modules (without it the kernel must have the virtio, vsock, overlay and ext4
# drivers built in).
#
# Result: OUT_DIR/vmlinuz, OUT_DIR/kernel.release, and the symlink
# BUILD_DIR/kernel/modules -> the lib/modules/<release> directory (absent when
# there are no modules), which initramfs/build.py reads.
# Re-runnable: an already unpacked package is reused (delete BUILD_DIR/kernel to
# fetch again; KERNEL_REFRESH=1 re-checks the archive for a newer version).
set -eu

OUT=${1:-out}
BUILD=${2:-build}
KDIR="$BUILD/kernel"
META=${KERNEL_PACKAGE:-linux-image-cloud-amd64}

say() { echo "[kernel] $*"; }
die() { echo "[kernel] ERROR: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "\`$1\` not found: apt-get install -y $2"; }

mkdir -p "$OUT" "$KDIR"

install_kernel() {  # install_kernel SRC: copy to OUT/vmlinuz when it differs
    if [ -f "$OUT/vmlinuz" ] && cmp -s "$1" "$OUT/vmlinuz"; then
        say "$OUT/vmlinuz: up to date"
    else
        cp "$1" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
        say "$OUT/vmlinuz <- $1 ($(($(wc -c < "$OUT/vmlinuz") / 1024)) KiB)"
    fi
}

set_modules() {  # set_modules DIR-or-empty
    rm -f "$KDIR/modules"
    if [ -n "$1" ]; then
        ln -s "$(cd "$1" && pwd)" "$KDIR/modules"
        say "modules: $1"
    else
        say "modules: none (all needed drivers must be built into the kernel)"
    fi
}

if [ -n "${KERNEL:-}" ]; then
    [ -f "$KERNEL" ] || die "KERNEL=$KERNEL: no such file"
    say "using KERNEL=$KERNEL"
    install_kernel "$KERNEL"
    if [ -n "${KERNEL_MODULES:-}" ]; then
        [ -d "$KERNEL_MODULES" ] || die "KERNEL_MODULES=$KERNEL_MODULES: no such directory"
        set_modules "$KERNEL_MODULES"
        basename "$(cd "$KERNEL_MODULES" && pwd)" > "$OUT/kernel.release"
    else
        set_modules ""
        echo "custom" > "$OUT/kernel.release"
    fi
    exit 0
fi

if [ -f "$KDIR/.stamp" ] && [ -d "$KDIR/root" ] && [ "${KERNEL_REFRESH:-0}" != 1 ]; then
    PKG=$(cat "$KDIR/.stamp")
    say "$PKG: already unpacked in $KDIR (delete it or KERNEL_REFRESH=1 to fetch again)"
else
    need apt-get apt
    need dpkg-deb dpkg
    DL="$KDIR/debs"
    rm -rf "$DL" && mkdir -p "$DL"
    # _apt cannot write into root's build dir; the download itself is fine
    chmod 0777 "$DL" 2>/dev/null || true
    say "resolving $META with apt-get download"
    (cd "$DL" && apt-get download -q "$META" 2>&1 | grep -v -e 'unsandboxed' -e '^Get:' || true)
    METADEB=$(ls "$DL"/"$META"_*.deb 2>/dev/null | head -n1)
    [ -n "$METADEB" ] || die "apt-get download $META failed (is apt configured? try apt-get update)"
    PKG=$(dpkg-deb -f "$METADEB" Depends | tr ',' '\n' | sed -n 's/^ *\(linux-image-[^ ]*\).*/\1/p' | head -n1)
    [ -n "$PKG" ] || die "$METADEB does not name a linux-image package"
    say "downloading $PKG"
    (cd "$DL" && apt-get download -q "$PKG" 2>&1 | grep -v -e 'unsandboxed' -e '^Get:' || true)
    DEB=$(ls "$DL"/"$PKG"_*.deb 2>/dev/null | head -n1)
    [ -n "$DEB" ] || die "apt-get download $PKG failed"
    say "unpacking $(basename "$DEB") into $KDIR/root"
    rm -rf "$KDIR/root"
    dpkg-deb -x "$DEB" "$KDIR/root"
    rm -rf "$DL"
    echo "$PKG" > "$KDIR/.stamp"
fi

VMLINUZ=$(ls "$KDIR"/root/boot/vmlinuz-* 2>/dev/null | head -n1)
[ -n "$VMLINUZ" ] || die "no boot/vmlinuz-* in $KDIR/root"
RELEASE=${VMLINUZ##*/vmlinuz-}
install_kernel "$VMLINUZ"
echo "$RELEASE" > "$OUT/kernel.release"
MODDIR=""
for d in "$KDIR/root/lib/modules/$RELEASE" "$KDIR/root/usr/lib/modules/$RELEASE"; do
    [ -d "$d" ] && MODDIR=$d && break
done
[ -n "$MODDIR" ] || die "no lib/modules/$RELEASE in $KDIR/root"
set_modules "$MODDIR"
