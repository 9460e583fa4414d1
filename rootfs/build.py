#!/usr/bin/env python3
"""Build a CBox guest image: a directory with rootfs.ext4 and image.json (no loop mounts).

    rootfs/build.py --name NAME [--images-dir out/images] [--dockerfile FILE]
                    [--kernel FILE] [--initramfs FILE] [--link out/rootfs.ext4]

The image NAME (cbox.py's VM-name rule) is the directory IMAGES_DIR/NAME:
  rootfs.ext4        the guest's read-only root filesystem
  image.json         what the builder wrote (see IMAGE_JSON below): when, from
                     what, sizes, the guest agent's version and protocol inside
  vmlinuz, initramfs.cpio.gz   only with --kernel / --initramfs: the image's own

Steps, each skipped when up to date:
  1. base    debootstrap --variant=minbase of Debian (default suite "stable")
             with python3, bash, coreutils, iproute2, procps, ca-certificates
             and curl, cached as build/rootfs-base.tar.  The mirror is read
             from the host's apt configuration (/etc/apt/sources.list,
             /etc/apt/sources.list.d/*.list|*.sources); --mirror overrides it,
             and without either debootstrap's own default is used.
  2. tree    the base tar unpacked into build/images/NAME/tree, or, with
             --dockerfile, the filesystem of a container built by podman or
             docker (the Dockerfile may say `FROM cbox-base`, the base imported
             as a local image) exported into that tree.
  3. agent   guest_agent.py -> /usr/local/sbin/guest_agent.py (what the
             initramfs switches to), the `cbox_callback` command
             (/usr/local/bin/cbox_callback) and the `cbox_callback` Python
             module (in python3's site-packages), then a check inside the
             tree (chroot): python3 runs, the agent compiles, cbox_callback
             imports.
  4. image   mke2fs -t ext4 -d TREE IMAGES_DIR/NAME/rootfs.ext4.tmp, sized as
             content + margin.
  5. publish each new file renamed over the old one, image.json last: a VM
             running on the old rootfs keeps its open file, a new start gets
             the new one, and no reader ever sees a half-written image (a
             failed build leaves the old image as it was).  --link makes a
             symlink (e.g. out/rootfs.ext4, the config's rootfs) point at it.

Runs as root (debootstrap, chroot, file ownership).  Stdlib only.
"""
import argparse
import ast
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE = "python3,bash,coreutils,iproute2,procps,ca-certificates,curl"
AGENT_DST = "usr/local/sbin/guest_agent.py"
SHIM_DST = "usr/local/bin/cbox_callback"
BASE_IMAGE = "cbox-base"          # local image name the Dockerfile can start FROM
BUILD_IMAGE = "cbox-image"        # local image the Dockerfile is built as (tag: the image name)
TOOLS = {                         # tool -> Debian package
    "debootstrap": "debootstrap",
    "mke2fs": "e2fsprogs",
    "tar": "tar",
    "chroot": "coreutils",
}
IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")   # cbox.py's VM_NAME_PATTERN
IMAGE_FORMAT = 1                  # image.json's layout version
ROOTFS = "rootfs.ext4"
IMAGE_JSON = "image.json"
KERNEL = "vmlinuz"
INITRAMFS = "initramfs.cpio.gz"
PROGRESS_EVERY_S = 5.0

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


LABEL = ["rootfs"]                # what each line of output starts with: [image NAME]


def say(msg):
    print(f"[{LABEL[0]}] {msg}", flush=True)


def die(msg):
    print(f"[{LABEL[0]}] ERROR: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def need(tool, package=None):
    if not shutil.which(tool):
        die(f"`{tool}` not found: apt-get install -y {package or TOOLS.get(tool, tool)}")


def run(cmd, progress=None, **kw):
    """Runs cmd, dying when it fails; progress(): a line said every PROGRESS_EVERY_S
    while it runs (for the steps that print nothing themselves)."""
    say("$ " + " ".join(cmd))
    t0 = time.monotonic()
    with subprocess.Popen(cmd, **kw) as proc:
        while True:
            try:
                proc.wait(timeout=PROGRESS_EVERY_S if progress else None)
                break
            except subprocess.TimeoutExpired:
                say(f"  ... {progress()} ({time.monotonic() - t0:.0f}s)")
    if proc.returncode != 0:
        die(f"command failed (exit {proc.returncode}): {' '.join(cmd)}")
    return proc


def mib(nbytes):
    return f"{nbytes / (1 << 20):.0f} MiB"


def untar(tar, tree):
    """tar -x of the archive `tar` into tree, with progress by the bytes read."""
    total = os.path.getsize(tar)
    say(f"$ tar -C {tree} -xf {tar}")
    t0 = last = time.monotonic()
    done = 0
    with open(tar, "rb") as src, subprocess.Popen(
            ["tar", "--numeric-owner", "--xattrs", "-C", tree, "-xf", "-"], stdin=subprocess.PIPE) as proc:
        try:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                proc.stdin.write(chunk)
                done += len(chunk)
                if time.monotonic() - last >= PROGRESS_EVERY_S:
                    last = time.monotonic()
                    say(f"  ... unpacked {mib(done)} of {mib(total)} ({last - t0:.0f}s)")
        except BrokenPipeError:
            pass                  # tar ended early: its exit status says why
        proc.stdin.close()
    if proc.returncode != 0:
        die(f"unpacking {tar} failed (tar exit {proc.returncode})")


def allocated(path):
    """Bytes of disk a (sparse) file holds so far: the progress of a writer of it."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


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


@contextlib.contextmanager
def locked(path, what):
    """An exclusive flock on path for the block; dies at once when another build holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            die(f"another build of {what} is running (it holds {path}); wait for it to end")
        yield
    finally:
        os.close(fd)


def base_source(args):
    """What the debootstrap base is made from (rootfs-base.tar.json; image.json's source.base)."""
    return {"suite": args.suite, "mirror": args.mirror or pick_mirror(), "include": INCLUDE,
            "variant": "minbase"}


def step_base(args):
    tar = os.path.join(args.build, "rootfs-base.tar")
    with locked(tar + ".lock", "the debootstrap base"):
        return make_base(args, tar)


def make_base(args, tar):
    stamp = tar + ".json"
    want = base_source(args)
    mirror = want["mirror"]
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
    run(["tar", "--numeric-owner", "--xattrs", "-C", d, "-cf", tar + ".tmp", "."],
        progress=lambda: f"packed {mib(allocated(tar + '.tmp'))}")
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
    die("--dockerfile needs podman or docker (a running daemon): apt-get install -y podman")


def engine_version(cmd):
    r = subprocess.run(cmd + ["--version"], capture_output=True, text=True)
    return r.stdout.strip() or cmd[0]


def step_tree_from_dockerfile(args, base_tar, tree):
    """The Dockerfile's container filesystem in tree; returns what image.json's source tells
    of the build (engine, the built image's id)."""
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
    tag = f"{BUILD_IMAGE}:{args.name}"
    iidfile = os.path.join(os.path.dirname(tree), "image-id")
    say(f"tree: building {dockerfile} (context {context})")
    run(cmd + ["build"] + build_opts + ["--iidfile", iidfile, "-f", dockerfile, "-t", tag, context])
    image_id = open(iidfile).read().strip()
    name = f"cbox-image-export-{os.getpid()}"
    export = os.path.join(os.path.dirname(tree), "export.tar")
    run(cmd + ["create", "--name", name, tag, "/bin/true"], stdout=subprocess.DEVNULL)
    try:
        run(cmd + ["export", "-o", export, name], progress=lambda: f"exported {mib(allocated(export))}")
    finally:
        subprocess.run(cmd + ["rm", "-f", name], capture_output=True)
        subprocess.run(cmd + ["rmi", tag], capture_output=True)   # layers are copies (vfs): free them
    untar(export, tree)
    os.unlink(export)
    # the container runtime bind-mounts these; the export leaves empty stubs
    for stub in ("etc/hostname", "etc/hosts", "etc/resolv.conf"):
        p = os.path.join(tree, stub)
        if os.path.isfile(p) and os.path.getsize(p) == 0 and not os.path.islink(p):
            os.unlink(p)
    for sub in ("dev", "proc", "sys", "run", "tmp"):
        os.makedirs(os.path.join(tree, sub), exist_ok=True)
    return {"engine": engine_version(cmd[:1]), "imageId": image_id}


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
    python = r.stdout.strip()
    say(f"agent: check ok (python {python}, agent compiles, cbox_callback imports)")
    return python


def agent_facts(path):
    """{"version", "protocol", "sha256"} of a guest_agent.py, read from its source (the
    top-level AGENT_VERSION and AGENT_PROTOCOL; an agent older than AGENT_PROTOCOL is 0)."""
    data = open(path, "rb").read()
    found = {"AGENT_VERSION": None, "AGENT_PROTOCOL": 0}
    for node in ast.parse(data).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id in found:
            with contextlib.suppress(ValueError):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return {"version": found["AGENT_VERSION"], "protocol": found["AGENT_PROTOCOL"],
            "sha256": hashlib.sha256(data).hexdigest()}


def debian_version(tree):
    try:
        return open(os.path.join(tree, "etc/debian_version")).read().strip()
    except OSError:
        return None


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


def step_image(args, tree, out):
    """The ext4 image of tree written to out; returns the tree's content bytes."""
    need("mke2fs")
    content, inodes = tree_size(tree)
    size = int(content * 1.10) + args.margin_mb * (1 << 20) + inodes * 256   # + inode tables
    size = (size + (1 << 20) - 1) >> 20 << 20
    if os.path.exists(out):
        os.unlink(out)
    say(f"image: {mib(content)} in {inodes} files -> {mib(size)} ext4 {out}")
    # read-only lower layer of the guest's overlay: no journal, no reserved blocks
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0",
         "-L", "cbox-rootfs", "-N", str(inodes + 4096), "-E", "root_owner=0:0",
         "-d", tree, out, f"{size // 1024}k"], stdout=subprocess.DEVNULL,
        progress=lambda: f"written {mib(allocated(out))} of about {mib(content)}")
    return content


def fingerprint(args, base_tar):
    """What the image is made of: equal fingerprints, equal images (the up-to-date check)."""
    h = hashlib.sha256()
    h.update(open(os.path.abspath(__file__), "rb").read())
    h.update(sha256_file(args.agent).encode())
    st = os.stat(base_tar)
    h.update(f"{base_tar}:{st.st_size}:{st.st_mtime_ns}".encode())
    if args.dockerfile:
        h.update(b"dockerfile:" + open(args.dockerfile, "rb").read())
        for root, dirs, files in os.walk(args.context):      # what COPY/ADD may take
            dirs.sort()
            for f in sorted(files):
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(root, f))
                    h.update(f"{os.path.join(root, f)}:{st.st_size}:{st.st_mtime_ns}".encode())
    for extra in (args.kernel, args.initramfs):
        h.update(f"extra:{extra and sha256_file(extra)}".encode())
    h.update(str(args.margin_mb).encode())
    return h.hexdigest()


# ---- the image directory ----------------------------------------------------

def shown_path(path):
    """path relative to the checkout when inside it (image.json stays true when it moves)."""
    rel = os.path.relpath(path, REPO)
    return path if rel.startswith("..") else rel


def read_image_json(image_dir):
    try:
        with open(os.path.join(image_dir, IMAGE_JSON)) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def up_to_date(image_dir, fp):
    meta = read_image_json(image_dir)
    if not meta or meta.get("fingerprint") != fp:
        return False
    files = [meta.get("rootfs")] + [meta[key] for key in ("kernel", "initramfs") if meta.get(key)]
    return all(isinstance(f, str) and os.path.isfile(os.path.join(image_dir, f)) for f in files)


def write_synced(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(image_dir, staged, meta):
    """Renames each staged file (final name -> its .tmp beside it) over its final name, then
    image.json: an image is there once its image.json is; a rebuild swaps file by file, each
    rename atomic, so a reader gets the old file or the new one, never a part. Files of the
    old image the new one lacks (an own kernel dropped) go last."""
    for tmp in staged.values():
        fsync_path(tmp)
    write_synced(os.path.join(image_dir, IMAGE_JSON + ".tmp"),
                 (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    for final, tmp in staged.items():
        os.replace(tmp, os.path.join(image_dir, final))
    os.replace(os.path.join(image_dir, IMAGE_JSON + ".tmp"), os.path.join(image_dir, IMAGE_JSON))
    for gone in {KERNEL, INITRAMFS} - set(staged):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(image_dir, gone))
    fsync_path(image_dir)


def link(path, target):
    """path becomes a symlink to target (relative), replaced atomically (a regular file
    there, an image built before image directories, is replaced too)."""
    rel = os.path.relpath(target, os.path.dirname(path))
    if os.path.islink(path) and os.readlink(path) == rel:
        return
    tmp = f"{path}.tmp-link"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(rel, tmp)
    os.replace(tmp, path)
    say(f"link: {path} -> {rel}")


def image_source(args, container):
    base = base_source(args)
    if not args.dockerfile:
        return {"type": "debootstrap", **base}
    return {"type": "dockerfile", "dockerfile": shown_path(args.dockerfile),
            "sha256": sha256_file(args.dockerfile), "context": shown_path(args.context),
            "base": base, **container}


def stage_extras(args, image_dir):
    """The image's own kernel / initramfs copied beside it as .tmp files: {final name: tmp}."""
    staged = {}
    for final, src in ((KERNEL, args.kernel), (INITRAMFS, args.initramfs)):
        if src:
            tmp = os.path.join(image_dir, final + ".tmp")
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o644)
            staged[final] = tmp
    return staged


def build(args, image_dir, base_tar, fp):
    """Builds the image into .tmp files of image_dir and publishes it."""
    need("chroot")
    scratch = os.path.join(args.build, "images", args.name)
    tree = os.path.join(scratch, "tree")
    if os.path.exists(scratch):
        shutil.rmtree(scratch)
    os.makedirs(tree)
    container = {}
    if args.dockerfile:
        container = step_tree_from_dockerfile(args, base_tar, tree)
    else:
        say(f"tree: unpacking {base_tar}")
        untar(base_tar, tree)
    freed = trim(tree)
    if freed:
        say(f"tree: trimmed {freed >> 20} MiB (docs, man pages, translations, apt caches)")
    python = step_agent(args, tree)
    agent = agent_facts(os.path.join(tree, AGENT_DST))
    debian = debian_version(tree)
    rootfs_tmp = os.path.join(image_dir, ROOTFS + ".tmp")
    content = step_image(args, tree, rootfs_tmp)
    shutil.rmtree(scratch)
    staged = {ROOTFS: rootfs_tmp, **stage_extras(args, image_dir)}
    meta = {"format": IMAGE_FORMAT, "name": args.name,
            "builtAt": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source": image_source(args, container),
            "rootfs": ROOTFS, "sizeBytes": os.path.getsize(rootfs_tmp), "contentBytes": content,
            "agent": agent, "python": python, "debian": debian,
            "kernel": KERNEL if KERNEL in staged else None,
            "initramfs": INITRAMFS if INITRAMFS in staged else None,
            "fingerprint": fp}
    publish(image_dir, staged, meta)
    return meta


def clean_up_failed(args, image_dir, new_dir):
    """After a failed build (an error, ^C): its scratch and .tmp files go, the old image stays
    as it was, and the directory this build made for a new image goes."""
    shutil.rmtree(os.path.join(args.build, "images", args.name), ignore_errors=True)
    clear_leftovers(image_dir)
    if new_dir and read_image_json(image_dir) is None:
        shutil.rmtree(image_dir, ignore_errors=True)


def clear_leftovers(image_dir):
    """.tmp files of a build that died (a crash, ^C): never part of the image."""
    for name in os.listdir(image_dir):
        if name.endswith(".tmp"):
            os.unlink(os.path.join(image_dir, name))


def check_args(p, args):
    """Bad input named before anything is built."""
    if not IMAGE_NAME_RE.match(args.name):
        p.error(f"bad image name {args.name!r}: 1-63 characters, letters, digits, '_', '.', '-', "
                f"starting with a letter or digit")
    if args.dockerfile is not None:
        args.dockerfile = os.path.abspath(args.dockerfile)
        if not os.path.isfile(args.dockerfile):
            p.error(f"Dockerfile not found: {args.dockerfile}")
        args.context = os.path.abspath(args.context or os.path.dirname(args.dockerfile))
        if not os.path.isdir(args.context):
            p.error(f"build context is not a directory: {args.context}")
    elif args.context:
        p.error("--context needs --dockerfile")
    for what in ("agent", "kernel", "initramfs"):
        path = getattr(args, what)
        if path is not None and not os.path.isfile(path):
            p.error(f"--{what}: no such file: {path}")
    if args.margin_mb < 0:
        p.error("--margin-mb must be >= 0")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", default="default", help="the image's name (default: default)")
    p.add_argument("--images-dir", default=os.path.join(REPO, "out", "images"),
                   help="where images live (default out/images); the image is IMAGES_DIR/NAME")
    p.add_argument("--link", default=None,
                   help="make this path a symlink to the image's rootfs.ext4 (e.g. out/rootfs.ext4)")
    p.add_argument("--build", default=os.path.join(REPO, "build"))
    p.add_argument("--agent", default=os.path.join(REPO, "guest_agent.py"))
    p.add_argument("--suite", default="stable", help="Debian suite for debootstrap (default stable)")
    p.add_argument("--mirror", default=os.environ.get("MIRROR") or None,
                   help="Debian mirror URI (default: the host's apt sources)")
    p.add_argument("--dockerfile", default=None,
                   help="build the tree with podman/docker from this Dockerfile")
    p.add_argument("--context", default=None, help="build context for --dockerfile (default its directory)")
    p.add_argument("--kernel", default=None, help="the image's own guest kernel (copied into it)")
    p.add_argument("--initramfs", default=None, help="the image's own initramfs (copied into it)")
    p.add_argument("--margin-mb", type=int, default=32,
                   help="free space left in the image (MiB; it is mounted read-only)")
    p.add_argument("--force", action="store_true", help="rebuild the image even when up to date")
    args = p.parse_args()
    check_args(p, args)
    LABEL[0] = f"image {args.name}"
    if os.geteuid() != 0:
        die("run as root (debootstrap, chroot and file ownership need it)")
    args.build = os.path.abspath(args.build)
    image_dir = os.path.join(os.path.abspath(args.images_dir), args.name)
    os.makedirs(args.build, exist_ok=True)
    new_dir = not os.path.isdir(image_dir)
    os.makedirs(image_dir, exist_ok=True)
    t0 = time.monotonic()
    with locked(os.path.join(image_dir, ".build.lock"), f"image {args.name}"):
        try:
            clear_leftovers(image_dir)
            base_tar = step_base(args)
            fp = fingerprint(args, base_tar)
            if not args.force and up_to_date(image_dir, fp):
                say(f"up to date ({image_dir}; --force or FORCE=1 rebuilds it)")
            else:
                meta = build(args, image_dir, base_tar, fp)
                say(f"done: {image_dir} ({mib(meta['sizeBytes'])} rootfs, agent {meta['agent']['version']} "
                    f"protocol {meta['agent']['protocol']}) in {time.monotonic() - t0:.0f}s")
        except BaseException:
            clean_up_failed(args, image_dir, new_dir)
            raise
        if args.link:
            link(os.path.abspath(args.link), os.path.join(image_dir, ROOTFS))


if __name__ == "__main__":
    main()
