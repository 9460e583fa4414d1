#!/usr/bin/env python3
"""Build CBox's guest root filesystem image (ext4, no loop mounts).

Steps, each skipped when up to date:
  1. base    debootstrap --variant=minbase of Debian (default suite "stable")
             with python3, bash, coreutils, iproute2, procps, ca-certificates
             and curl, cached as build/rootfs-base.tar.  The mirror is read
             from the host's apt configuration (/etc/apt/sources.list,
             /etc/apt/sources.list.d/*.list|*.sources); --mirror overrides it,
             and without either debootstrap's own default is used.
  2. tree    the base tar unpacked into build/rootfs-tree, or, with
             --dockerfile, the filesystem of a container built by podman or
             docker (the Dockerfile may say `FROM cbox-base`, the base imported
             as a local image) exported into build/rootfs-tree.
  3. agent   guest_agent.py -> /usr/local/sbin/guest_agent.py (what the
             initramfs switches to), the `cbox_callback` command
             (/usr/local/bin/cbox_callback) and the `cbox_callback` Python
             module (in python3's site-packages), then a check inside the
             tree (chroot): python3 runs, the agent compiles, cbox_callback
             imports.
  4. image   mke2fs -t ext4 -d build/rootfs-tree out/rootfs.ext4, sized as
             content + margin.

Runs as root (debootstrap, chroot, file ownership).  Stdlib only.
"""
import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE = "python3,bash,coreutils,iproute2,procps,ca-certificates,curl"
AGENT_DST = "usr/local/sbin/guest_agent.py"
SHIM_DST = "usr/local/bin/cbox_callback"
BASE_IMAGE = "cbox-base"          # local image name the Dockerfile can start FROM
TOOLS = {                         # tool -> Debian package
    "debootstrap": "debootstrap",
    "mke2fs": "e2fsprogs",
    "tar": "tar",
    "chroot": "coreutils",
}

SHIM = r'''#!/usr/bin/python3 -S
"""cbox_callback METHOD ['{"json": "params"}'] - call the CBox host from the guest.

Prints the result as JSON on stdout (exit 0); on error prints
"Error: <message>" on stderr (exit 1).  Installed by rootfs/build.py; the
implementation lives in /usr/local/sbin/guest_agent.py.
"""
import os
import sys

AGENT = "/usr/local/sbin/guest_agent.py"
os.execv(sys.executable, [sys.executable, "-S", AGENT, "callback"] + sys.argv[1:])
'''

MODULE = r'''"""cbox_callback: call the CBox host from a guest program.

    from cbox_callback import callback, CallbackError
    result = callback("method", {"k": 1}, timeout=30)

Installed by rootfs/build.py; loads the implementation from
/usr/local/sbin/guest_agent.py (its callback() and CallbackError).
"""
import importlib.util as _ilu
import sys as _sys

_AGENT = "/usr/local/sbin/guest_agent.py"
_NAME = "cbox_guest_agent"

_mod = _sys.modules.get(_NAME)
if _mod is None:
    _spec = _ilu.spec_from_file_location(_NAME, _AGENT)
    _mod = _ilu.module_from_spec(_spec)
    _sys.modules[_NAME] = _mod
    _spec.loader.exec_module(_mod)

callback = _mod.callback
CallbackError = getattr(_mod, "CallbackError", Exception)
__all__ = ["callback", "CallbackError"]
'''


def say(msg):
    print(f"[rootfs] {msg}", flush=True)


def die(msg):
    print(f"[rootfs] ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def need(tool, package=None):
    if not shutil.which(tool):
        die(f"`{tool}` not found: apt-get install -y {package or TOOLS.get(tool, tool)}")


def run(cmd, **kw):
    say("$ " + " ".join(cmd))
    r = subprocess.run(cmd, **kw)
    if r.returncode != 0:
        die(f"command failed (exit {r.returncode}): {' '.join(cmd)}")
    return r


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- mirror from the host's apt configuration -------------------------------

def _deb822_stanzas(text):
    stanza = {}
    key = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
            continue
        if line[0] in " \t" and key:
            stanza[key] += " " + line.strip()
            continue
        if ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            stanza[key] = value.strip()
    if stanza:
        yield stanza


def host_mirrors():
    """(uri, suite) pairs of `deb` sources of the host, main archive first."""
    found = []
    files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
    for path in files:
        try:
            text = open(path).read()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            parts = line.split()
            if len(parts) < 3 or parts[0] != "deb":
                continue
            parts = parts[1:]
            if parts[0].startswith("["):           # options: [arch=amd64 signed-by=...]
                while parts and not parts[0].endswith("]"):
                    parts = parts[1:]
                parts = parts[1:]
            if len(parts) >= 2:
                found.append((parts[0], parts[1]))
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        try:
            text = open(path).read()
        except OSError:
            continue
        for st in _deb822_stanzas(text):
            if st.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in st.get("types", "").split():
                continue
            for uri in st.get("uris", "").split():
                for suite in st.get("suites", "").split():
                    found.append((uri, suite))
    return found


def pick_mirror():
    """The host's Debian archive mirror URI, or None (debootstrap's default)."""
    for uri, suite in host_mirrors():
        # the main archive, not security/updates/backports or third-party repos
        if "-" in suite or "security" in uri:
            continue
        if os.path.isdir(os.path.join("/usr/share/debootstrap/scripts")) and \
                not os.path.exists(os.path.join("/usr/share/debootstrap/scripts", suite)):
            continue          # not a suite debootstrap knows: not a Debian archive
        return uri.rstrip("/")
    return None


# ---- steps ------------------------------------------------------------------

# what the guest never needs: downloaded debs, apt lists, docs, man pages, translations
TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
        "usr/share/info", "usr/share/locale")
TRIM_KEEP = ("lock", "partial", "locale.alias")


def trim(tree):
    freed = 0
    for sub in TRIM:
        p = os.path.join(tree, sub)
        if not os.path.isdir(p) or os.path.islink(p):
            continue
        for entry in os.listdir(p):
            q = os.path.join(p, entry)
            if entry in TRIM_KEEP:
                continue
            if os.path.isdir(q) and not os.path.islink(q):
                freed += sum(os.lstat(os.path.join(r, f)).st_size
                             for r, _d, fs in os.walk(q) for f in fs)
                shutil.rmtree(q)
            else:
                freed += os.lstat(q).st_size
                os.unlink(q)
    return freed


def step_base(args):
    tar = os.path.join(args.build, "rootfs-base.tar")
    stamp = tar + ".json"
    mirror = args.mirror or pick_mirror()
    want = {"suite": args.suite, "mirror": mirror, "include": INCLUDE, "variant": "minbase"}
    if os.path.exists(tar) and os.path.exists(stamp):
        try:
            have = json.load(open(stamp))
        except ValueError:
            have = None
        if have == want:
            say(f"base: up to date ({tar}; delete it to bootstrap again)")
            return tar
    need("debootstrap")
    need("tar")
    d = os.path.join(args.build, "rootfs-base.d")
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    say(f"base: debootstrap {args.suite} from {mirror or 'debootstrap default mirror'} "
        f"(a few minutes)")
    t0 = time.monotonic()
    cmd = ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", args.suite, d]
    if mirror:
        cmd.append(mirror)
    run(cmd)
    trim(d)
    say("base: packing " + tar)
    run(["tar", "--numeric-owner", "--xattrs", "-C", d, "-cf", tar + ".tmp", "."])
    os.replace(tar + ".tmp", tar)
    shutil.rmtree(d)
    with open(stamp, "w") as f:
        json.dump(want, f)
    say(f"base: done in {time.monotonic() - t0:.0f}s")
    return tar


def container_tool():
    for tool in ("podman", "docker"):
        if shutil.which(tool):
            if tool == "docker":
                r = subprocess.run(["docker", "info"], capture_output=True)
                if r.returncode != 0:
                    continue          # a client without a daemon
            return tool
    die("--dockerfile needs podman or docker: apt-get install -y podman")


def step_tree_from_dockerfile(args, base_tar, tree):
    tool = container_tool()
    cmd = [tool]
    build_opts = []
    if tool == "podman":
        cmd += ["--storage-driver", "vfs"]
        build_opts = ["--isolation", "chroot"]
    dockerfile = os.path.abspath(args.dockerfile)
    context = os.path.abspath(args.context or os.path.dirname(dockerfile))
    st = os.stat(base_tar)
    version = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    if subprocess.run(cmd + ["image", "inspect", f"{BASE_IMAGE}:{version}"],
                      capture_output=True).returncode == 0:
        say(f"tree: local image {BASE_IMAGE}:{version} is up to date")
    else:
        say(f"tree: importing {base_tar} as local image {BASE_IMAGE} ({tool})")
        run(cmd + ["import", base_tar, f"{BASE_IMAGE}:{version}"], stdout=subprocess.DEVNULL)
    run(cmd + ["tag", f"{BASE_IMAGE}:{version}", f"{BASE_IMAGE}:latest"])
    tag = "cbox-rootfs:build"
    say(f"tree: building {dockerfile} (context {context})")
    run(cmd + ["build"] + build_opts + ["-f", dockerfile, "-t", tag, context])
    name = f"cbox-rootfs-export-{os.getpid()}"
    export = os.path.join(args.build, "rootfs-export.tar")
    run(cmd + ["create", "--name", name, tag, "/bin/true"], stdout=subprocess.DEVNULL)
    try:
        run(cmd + ["export", "-o", export, name])
    finally:
        subprocess.run(cmd + ["rm", "-f", name], capture_output=True)
        subprocess.run(cmd + ["rmi", tag], capture_output=True)   # layers are copies (vfs): free them
    run(["tar", "--numeric-owner", "--xattrs", "-C", tree, "-xf", export])
    os.unlink(export)
    # the container runtime bind-mounts these; the export leaves empty stubs
    for stub in ("etc/hostname", "etc/hosts", "etc/resolv.conf"):
        p = os.path.join(tree, stub)
        if os.path.isfile(p) and os.path.getsize(p) == 0 and not os.path.islink(p):
            os.unlink(p)
    for sub in ("dev", "proc", "sys", "run", "tmp"):
        os.makedirs(os.path.join(tree, sub), exist_ok=True)


def chroot_py(tree, code, capture=True):
    path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return subprocess.run(["chroot", tree, "/usr/bin/env", "-i", path, "python3", "-c", code],
                          capture_output=capture, text=True)


def step_agent(args, tree):
    agent = args.agent
    if not os.path.isfile(agent):
        die(f"guest agent not found: {agent}")
    dst = os.path.join(tree, AGENT_DST)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(agent, dst)
    os.chmod(dst, 0o755)
    r = chroot_py(tree, "import site; print(site.getsitepackages()[0])")
    if r.returncode != 0:
        die("python3 does not run inside the root filesystem: " + (r.stderr or r.stdout).strip())
    site = r.stdout.strip()
    shim = os.path.join(tree, SHIM_DST)
    mod = os.path.join(tree, site.lstrip("/"), "cbox_callback.py")
    for p in (shim, mod):
        os.makedirs(os.path.dirname(p), exist_ok=True)
    # the agent's own shims (`guest_agent.py install-shims DIR`) when it has
    # them, so that the image and a running agent agree; else the fallbacks here
    tmp = os.path.join(tree, "tmp", "cbox-shims")
    r = subprocess.run(["chroot", tree, "/usr/bin/python3", "/" + AGENT_DST, "install-shims",
                        "/tmp/cbox-shims"], capture_output=True, text=True)
    if r.returncode == 0 and os.path.isfile(os.path.join(tmp, "cbox_callback")) \
            and os.path.isfile(os.path.join(tmp, "cbox_callback.py")):
        shutil.move(os.path.join(tmp, "cbox_callback"), shim)
        shutil.move(os.path.join(tmp, "cbox_callback.py"), mod)
        source = "guest_agent.py install-shims"
    else:
        with open(shim, "w") as f:
            f.write(SHIM)
        with open(mod, "w") as f:
            f.write(MODULE)
        source = "built-in fallback shims (the agent has no install-shims)"
    shutil.rmtree(tmp, ignore_errors=True)
    os.chmod(shim, 0o755)
    os.chmod(mod, 0o644)
    say(f"agent: installed /{AGENT_DST}, /{SHIM_DST}, {site}/cbox_callback.py ({source})")
    # check: python3 present, the agent compiles and cbox_callback imports
    code = ("import sys; compile(open('/%s', 'rb').read(), 'guest_agent.py', 'exec'); "
            "import cbox_callback; assert callable(cbox_callback.callback); "
            "print(sys.version.split()[0])" % AGENT_DST)
    r = chroot_py(tree, code)
    if r.returncode != 0:
        text = (r.stderr or r.stdout).strip()
        die("check inside the root filesystem failed (python3 / guest agent / cbox_callback): "
            + (text.splitlines()[-1] if text else f"exit {r.returncode}"))
    say(f"agent: check ok (python {r.stdout.strip()}, agent compiles, cbox_callback imports)")


def tree_size(tree):
    total = 0
    inodes = 0
    for root, dirs, files in os.walk(tree):
        for name in dirs + files:
            inodes += 1
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.isdir(os.path.join(root, name)) or os.path.islink(os.path.join(root, name)):
                # round each file up to the 4 KiB block
                total += (st.st_size + 4095) // 4096 * 4096
            else:
                total += 4096
    return total, inodes


def step_image(args, tree):
    need("mke2fs")
    content, inodes = tree_size(tree)
    mib = 1 << 20
    size = int(content * 1.10) + args.margin_mb * mib + inodes * 256   # + inode tables
    size = (size + mib - 1) // mib * mib
    tmp = args.out + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    say(f"image: {content / mib:.0f} MiB in {inodes} files -> {size // mib} MiB ext4 {args.out}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # read-only lower layer of the guest's overlay: no journal, no reserved blocks
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0",
         "-L", "cbox-rootfs", "-N", str(inodes + 4096), "-E", "root_owner=0:0",
         "-d", tree, tmp, f"{size // 1024}k"], stdout=subprocess.DEVNULL)
    os.replace(tmp, args.out)


def fingerprint(args, base_tar):
    h = hashlib.sha256()
    h.update(open(os.path.abspath(__file__), "rb").read())
    h.update(sha256_file(args.agent).encode())
    st = os.stat(base_tar)
    h.update(f"{base_tar}:{st.st_size}:{st.st_mtime_ns}".encode())
    if args.dockerfile:
        h.update(b"dockerfile:" + open(args.dockerfile, "rb").read())
    h.update(str(args.margin_mb).encode())
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "out", "rootfs.ext4"))
    p.add_argument("--build", default=os.path.join(REPO, "build"))
    p.add_argument("--agent", default=os.path.join(REPO, "guest_agent.py"))
    p.add_argument("--suite", default="stable", help="Debian suite for debootstrap (default stable)")
    p.add_argument("--mirror", default=os.environ.get("MIRROR") or None,
                   help="Debian mirror URI (default: the host's apt sources)")
    p.add_argument("--dockerfile", default=None,
                   help="build the tree with podman/docker from this Dockerfile")
    p.add_argument("--context", default=None, help="build context for --dockerfile (default its directory)")
    p.add_argument("--margin-mb", type=int, default=32,
                   help="free space left in the image (MiB; it is mounted read-only)")
    p.add_argument("--force", action="store_true", help="rewrite the image even when up to date")
    args = p.parse_args()
    if os.geteuid() != 0:
        die("run as root (debootstrap, chroot and file ownership need it)")
    args.build = os.path.abspath(args.build)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.build, exist_ok=True)
    t0 = time.monotonic()
    base_tar = step_base(args)
    if not os.path.isfile(args.agent):
        die(f"guest agent not found: {args.agent}")
    fp = fingerprint(args, base_tar)
    stamp = args.out + ".stamp"
    if not args.force and os.path.exists(args.out) and os.path.exists(stamp) \
            and open(stamp).read().strip() == fp:
        say(f"image: up to date ({args.out})")
        return
    need("chroot")
    tree = os.path.join(args.build, "rootfs-tree")
    if os.path.exists(tree):
        shutil.rmtree(tree)
    os.makedirs(tree)
    if args.dockerfile:
        step_tree_from_dockerfile(args, base_tar, tree)
    else:
        say(f"tree: unpacking {base_tar}")
        run(["tar", "--numeric-owner", "--xattrs", "-C", tree, "-xf", base_tar])
        freed = trim(tree)
        if freed:
            say(f"tree: trimmed {freed >> 20} MiB (docs, man pages, translations, apt caches)")
    step_agent(args, tree)
    step_image(args, tree)
    with open(stamp, "w") as f:
        f.write(fp + "\n")
    shutil.rmtree(tree)
    say(f"done: {args.out} ({os.path.getsize(args.out) >> 20} MiB) in {time.monotonic() - t0:.0f}s")


if __name__ == "__main__":
    main()
