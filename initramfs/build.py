#!/usr/bin/env python3
"""Build CBox's initramfs: static busybox + initramfs/init + the kernel modules
the guest needs, as a gzip'd newc cpio (written in Python, no cpio tool).

Modules wanted (each skipped when the kernel has it built in, per
modules.builtin): virtio over PCI (the only transport Cloud Hypervisor gives
on x86-64), virtio_blk, virtio_net, the virtio vsock transport, overlay,
ext4; optional, packed when the kernel has them: virtio over MMIO (QEMU
microvm's other transport), virtio_rng, pvpanic + pvpanic_pci (guest-panic
reports to the VMM, `"pvpanic": true` in a VmConfig).  Their dependencies are
read from each module's own modinfo ("depends=", plus "softdep=pre:" when
available) - the same data depmod uses - so nothing is hard-coded but the
wanted names.  The load order (dependencies first) goes to /etc/cbox-modules;
the optional ones among them to /etc/cbox-optional (init goes on when one
fails to load); the wanted modules that are built in are listed in
/etc/cbox-builtin.

Usage: initramfs/build.py --modules DIR [--out out/initramfs.cpio.gz]
  DIR is a lib/modules/<release> directory (modules.builtin + kernel/...);
  without --modules no module is packed (a kernel with everything built in).
Skips the work when the output is up to date.  Stdlib only.
"""
import argparse
import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# required: the guest cannot work without them (unless built in)
REQUIRED = ["virtio_pci", "virtio_blk", "virtio_net",
            "vmw_vsock_virtio_transport", "overlay", "ext4"]
# optional: packed when the kernel has them, silently skipped otherwise.
# virtio_mmio: Cloud Hypervisor on x86-64 uses virtio-pci only (vmm/src/device_manager.rs),
# MMIO is for QEMU microvm boots; pvpanic_pci: the device behind `"pvpanic": true`
OPTIONAL = ["virtio_mmio", "virtio_rng", "pvpanic", "pvpanic_pci"]

# busybox applets the init script uses (a symlink each in /bin)
APPLETS = ["sh", "mount", "umount", "insmod", "switch_root", "poweroff", "sleep",
           "usleep", "cat", "mkdir", "readlink", "cut", "uname", "sync", "echo",
           "test", "[", "ls", "dmesg"]


def say(msg):
    print(f"[initramfs] {msg}", flush=True)


def die(msg):
    print(f"[initramfs] ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def norm(name):
    return name.replace("-", "_")


# ---- modules ----------------------------------------------------------------

def read_module(path):
    """The uncompressed bytes of a .ko / .ko.xz / .ko.gz / .ko.zst file."""
    if path.endswith(".ko"):
        return open(path, "rb").read()
    if path.endswith(".ko.xz"):
        return lzma.decompress(open(path, "rb").read())
    if path.endswith(".ko.gz"):
        return gzip.decompress(open(path, "rb").read())
    if path.endswith(".ko.zst"):
        if not shutil.which("zstd"):
            die(f"{path} is zstd-compressed: apt-get install -y zstd")
        return subprocess.run(["zstd", "-dc", path], check=True, capture_output=True).stdout
    die(f"unknown module format: {path}")


def modinfo(data):
    """key -> [values] from the .modinfo strings of a module (NUL separated)."""
    info = {}
    # the .modinfo section is a run of "key=value\0" strings; scanning the whole
    # file for the keys we need is simpler than parsing ELF and equally exact
    for key in (b"depends=", b"softdep=", b"name="):
        start = 0
        while True:
            i = data.find(b"\0" + key, start)
            if i < 0:
                break
            j = data.find(b"\0", i + 1)
            value = data[i + 1 + len(key):j].decode("utf-8", "replace")
            info.setdefault(key[:-1].decode(), []).append(value)
            start = j
    return info


class Modules:
    def __init__(self, moddir):
        self.dir = moddir
        self.builtin = set()
        bpath = os.path.join(moddir, "modules.builtin")
        if os.path.exists(bpath):
            for line in open(bpath):
                base = os.path.basename(line.strip())
                if base:
                    self.builtin.add(norm(base.split(".ko")[0]))
        else:
            say(f"warning: {bpath} missing: assuming no module is built in")
        self.files = {}
        for root, _dirs, files in os.walk(moddir):
            for f in files:
                if ".ko" in f and f.split(".ko")[1] in ("", ".xz", ".gz", ".zst"):
                    self.files.setdefault(norm(f.split(".ko")[0]), os.path.join(root, f))
        self._info = {}

    def info(self, name):
        if name not in self._info:
            self._info[name] = modinfo(read_module(self.files[name]))
        return self._info[name]

    def deps(self, name):
        info = self.info(name)
        hard = [norm(d) for v in info.get("depends", []) for d in v.split(",") if d]
        soft = []
        for v in info.get("softdep", []):
            # "pre: a b post: c" -> pre-dependencies a, b
            words = v.split()
            mode = None
            for w in words:
                if w.endswith(":"):
                    mode = w[:-1]
                elif mode == "pre":
                    soft.append(norm(w))
        return hard, soft

    def resolve(self, required, optional, omit=()):
        """(load order, built-in wanted names, missing optional names)."""
        order, seen, builtin, skipped = [], set(), [], []

        def visit(name, stack, must):
            if name in seen or name in omit:
                return True
            if name in self.builtin:
                seen.add(name)
                if name in required or name in optional:
                    builtin.append(name)
                return True
            if name not in self.files:
                if must:
                    die(f"kernel module {name} is neither built in nor in {self.dir}"
                        + (f" (needed by {stack[-1]})" if stack else ""))
                skipped.append(name)
                return False
            if name in stack:
                die("module dependency cycle: " + " -> ".join(stack + [name]))
            hard, soft = self.deps(name)
            for d in hard:
                visit(d, stack + [name], True)
            for d in soft:
                visit(d, stack + [name], False)
            seen.add(name)
            order.append(name)
            return True

        for name in required:
            visit(norm(name), [], True)
        for name in optional:
            visit(norm(name), [], False)
        return order, builtin, skipped


# ---- cpio (newc) ------------------------------------------------------------

class Cpio:
    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1
        self.names = set()

    def _entry(self, name, mode, data=b"", rdev=(0, 0), nlink=1):
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        self.ino += 1
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0))
        self.buf.write(hdr.encode() + nameb)
        self.buf.write(b"\0" * (-(110 + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name, perm=0o755):
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | perm, nlink=2)

    def file(self, name, data, perm=0o644):
        if "/" in name.strip("/"):
            self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name, major, minor, perm=0o600):
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0, nlink=1)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def busybox_applets(busybox):
    r = subprocess.run([busybox, "--list"], capture_output=True, text=True)
    return set(r.stdout.split()) if r.returncode == 0 else set()


def build(args):
    busybox = args.busybox
    if not os.path.isfile(busybox):
        die(f"static busybox not found at {busybox}: apt-get install -y busybox-static")
    with open(busybox, "rb") as f:
        head = f.read(1 << 16)
    if b"ld-linux" in head or b"/lib64/ld" in head:   # a dynamic ELF names its loader early
        die(f"{busybox} is dynamically linked: apt-get install -y busybox-static")
    have = busybox_applets(busybox)
    missing = [a for a in APPLETS if a not in have and a not in ("echo", "test", "[")]
    if have and missing:
        die(f"{busybox} lacks applets {missing}: apt-get install -y busybox-static")

    order, builtin, skipped = [], [], []
    mods = None
    if args.modules:
        if not os.path.isdir(args.modules):
            die(f"modules directory not found: {args.modules}")
        mods = Modules(args.modules)
        order, builtin, skipped = mods.resolve(REQUIRED, OPTIONAL, omit=set(args.omit))
        say(f"modules: load order {' '.join(order) or '(none)'}")
        say(f"modules: built in {' '.join(builtin) or '(none)'}")
        if skipped:
            say(f"modules: not available (optional) {' '.join(skipped)}")
    else:
        say("modules: no --modules directory: packing none (the kernel must have "
            f"{', '.join(REQUIRED)} built in)")
    if args.omit:
        say(f"modules: omitted on request: {' '.join(args.omit)}")

    c = Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "etc", "lib/modules", "mnt/lower",
              "mnt/state", "newroot", "tmp", "root"):
        c.dir(d)
    # the kernel opens /dev/console before running /init: it must exist here
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("init", open(args.init, "rb").read(), 0o755)
    c.file("bin/busybox", open(busybox, "rb").read(), 0o755)
    for a in APPLETS:
        if a in have or not have:
            c.symlink(f"bin/{a}", "busybox")
    total_mod = 0
    for name in order:
        data = read_module(mods.files[name])
        total_mod += len(data)
        c.file(f"lib/modules/{name}.ko", data)
    c.file("etc/cbox-modules", ("".join(n + "\n" for n in order)).encode())
    c.file("etc/cbox-builtin", ("".join(n + "\n" for n in builtin)).encode())
    c.file("etc/cbox-optional", ("".join(n + "\n" for n in order if n in OPTIONAL)).encode())
    raw = c.finish()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0) as g:
            g.write(raw)
    os.replace(tmp, args.out)
    say(f"wrote {args.out}: {os.path.getsize(args.out) // 1024} KiB gzip "
        f"({len(raw) // 1024} KiB cpio, {len(order)} modules = {total_mod // 1024} KiB)")


def fingerprint(args):
    h = hashlib.sha256()
    for p in (os.path.abspath(__file__), args.init, args.busybox):
        if os.path.exists(p):
            h.update(p.encode() + open(p, "rb").read())
    h.update(repr(sorted(args.omit)).encode())
    if args.modules and os.path.isdir(args.modules):
        h.update(os.path.abspath(args.modules).encode())
        for root, _d, files in sorted(os.walk(args.modules)):
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modules", default=None, help="lib/modules/<release> directory of the kernel")
    p.add_argument("--out", default=os.path.join(REPO, "out", "initramfs.cpio.gz"))
    p.add_argument("--init", default=os.path.join(HERE, "init"))
    p.add_argument("--busybox", default="/bin/busybox")
    p.add_argument("--omit", action="append", default=[],
                   help="leave this module out (tests of the failure path)")
    p.add_argument("--force", action="store_true")
    args = p.parse_args()
    args.out = os.path.abspath(args.out)
    stamp = args.out + ".stamp"
    fp = fingerprint(args)
    if not args.force and os.path.exists(args.out) and os.path.exists(stamp) \
            and open(stamp).read().strip() == fp:
        say(f"up to date ({args.out})")
        return
    build(args)
    with open(stamp, "w") as f:
        f.write(fp + "\n")


if __name__ == "__main__":
    main()
