"""The image builder (issue 20): rootfs/build.py makes named images, directories holding
rootfs.ext4 and image.json, and publishes a rebuild atomically; `make image` runs it.

Bad input is refused before anything is built; the real builds start from the debootstrap
base `make images` caches (build/rootfs-base.tar) and skip without it. Each build writes
into the test's own images directory and its own scratch (build/images/NAME, NAME unique).
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest

from conftest import REPO, unique

BUILDER = REPO / "rootfs" / "build.py"
BASE_TAR = REPO / "build" / "rootfs-base.tar"
AGENT = REPO / "guest_agent.py"
AGENT_IN_IMAGE = "/usr/local/sbin/guest_agent.py"


def load_builder():
    spec = importlib.util.spec_from_file_location("cbox_image_builder", BUILDER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def builder(*args, timeout=900):
    return subprocess.run([sys.executable, str(BUILDER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args,said", [
    (["--name", "a/b"], "bad image name 'a/b'"),
    (["--name=-rm"], "bad image name '-rm'"),
    (["--name", ".hidden"], "bad image name '.hidden'"),
    (["--name", "x" * 64], "bad image name"),
    (["--name", ""], "bad image name ''"),
    (["--name", "py", "--dockerfile", "no/such/Dockerfile"], "Dockerfile not found: "),
    (["--name", "py", "--context", "rootfs"], "--context needs --dockerfile"),
    (["--name", "py", "--kernel", "no-such-vmlinuz"], "--kernel: no such file: no-such-vmlinuz"),
    (["--name", "py", "--agent", "no-such-agent.py"], "--agent: no such file"),
])
def test_bad_input_is_refused_before_anything_is_built(tmp_path, args, said):
    images = tmp_path / "images"
    build = tmp_path / "build"
    r = builder(*args, "--images-dir", images, "--build", build, timeout=60)
    assert r.returncode == 2, r
    assert said in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not images.exists() and not build.exists()


def test_make_image_needs_a_name():
    r = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "image"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "make image: say which image: NAME=" in r.stderr, r.stderr
    r = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "-n", "image", "NAME=py",
                        "DOCKERFILE=rootfs/Dockerfile.py", "IMAGES_DIR=/x/images", "FORCE=1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    (cmd,) = [line for line in r.stdout.splitlines() if "rootfs/build.py" in line]
    assert '--name="py"' in cmd and '--images-dir "/x/images"' in cmd and "--force" in cmd
    assert '--dockerfile "rootfs/Dockerfile.py"' in cmd and "--link" not in cmd   # only "default" is linked


def test_publish_swaps_files_and_writes_image_json_last(tmp_path):
    """publish(): each staged .tmp renamed over its file (a reader holding the old file keeps
    it), image.json last, an own kernel the new image lacks removed."""
    b = load_builder()
    image = tmp_path / "py"
    image.mkdir()
    (image / "rootfs.ext4").write_bytes(b"old rootfs")
    (image / "vmlinuz").write_bytes(b"old kernel")
    (image / "image.json").write_text('{"name": "py", "old": true}')
    held = open(image / "rootfs.ext4", "rb")
    (image / "rootfs.ext4.tmp").write_bytes(b"new rootfs")
    (image / "initramfs.cpio.gz.tmp").write_bytes(b"new initramfs")
    order = []
    real_replace = os.replace

    def replace(src, dst):
        order.append(os.path.basename(dst))
        real_replace(src, dst)

    b.os.replace = replace
    try:
        b.publish(str(image), {"rootfs.ext4": str(image / "rootfs.ext4.tmp"),
                               "initramfs.cpio.gz": str(image / "initramfs.cpio.gz.tmp")}, {"name": "py"})
    finally:
        b.os.replace = real_replace
    assert order[-1] == "image.json" and set(order) == {"rootfs.ext4", "initramfs.cpio.gz", "image.json"}
    assert sorted(os.listdir(image)) == ["image.json", "initramfs.cpio.gz", "rootfs.ext4"]
    assert json.loads((image / "image.json").read_text()) == {"name": "py"}
    assert (image / "rootfs.ext4").read_bytes() == b"new rootfs" and held.read() == b"old rootfs"
    held.close()


def test_agent_facts_read_version_and_protocol(tmp_path):
    b = load_builder()
    facts = b.agent_facts(str(AGENT))
    sys.path.insert(0, str(REPO))
    import guest_agent
    assert facts["version"] == guest_agent.AGENT_VERSION and facts["protocol"] == guest_agent.AGENT_PROTOCOL >= 1
    old = tmp_path / "old_agent.py"
    old.write_text('AGENT_VERSION = "0.0.9"\n')          # an agent from before AGENT_PROTOCOL
    assert b.agent_facts(str(old))["protocol"] == 0 and b.agent_facts(str(old))["version"] == "0.0.9"


# ---- real builds from the debootstrap base ----------------------------------------------------

def need_base():
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot, file ownership)")
    if not (BASE_TAR.exists() and BASE_TAR.with_name("rootfs-base.tar.json").exists()):
        pytest.skip(f"{BASE_TAR} missing: run `make images` (it caches the debootstrap base)")
    for tool, package in (("mke2fs", "e2fsprogs"), ("debugfs", "e2fsprogs"), ("chroot", "coreutils")):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (apt-get install {package})")
    # the base is reused only for the suite and mirror it was made from
    stamp = json.loads(BASE_TAR.with_name("rootfs-base.tar.json").read_text())
    return ["--suite", stamp["suite"]] + (["--mirror", stamp["mirror"]] if stamp.get("mirror") else [])


def ext4_uuid(f):
    """The ext4 superblock's UUID (offset 1024 + 0x68) of an open file: which build it is."""
    f.seek(1024 + 0x38)
    assert f.read(2) == b"\x53\xef", "not an ext4 superblock"
    f.seek(1024 + 0x68)
    return f.read(16).hex()


def debugfs_cat(image, path):
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True).stdout


@pytest.fixture
def built(tmp_path):
    """(images dir, name, base args, the first build's output): an image from the base."""
    base = need_base()
    images, name = tmp_path / "images", unique("imgt")
    t0 = datetime.now(timezone.utc).replace(microsecond=0)
    (tmp_path / "rootfs.ext4").write_bytes(b"a rootfs built before named images")   # --link replaces it
    r = builder("--name", name, "--images-dir", images, "--build", REPO / "build", "--link", tmp_path / "rootfs.ext4",
                "--margin-mb", 8, *base)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    yield images, name, base, r.stdout, t0
    shutil.rmtree(REPO / "build" / "images" / name, ignore_errors=True)


def test_image_json_says_what_the_image_is(built, tmp_path):
    images, name, _base, out, t0 = built
    image = images / name
    assert sorted(os.listdir(image)) == [".build.lock", "image.json", "rootfs.ext4"]
    meta = json.loads((image / "image.json").read_text())
    sys.path.insert(0, str(REPO))
    import guest_agent
    assert meta["format"] == 1 and meta["name"] == name and meta["rootfs"] == "rootfs.ext4"
    built_at = datetime.strptime(meta["builtAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert t0 <= built_at <= datetime.now(timezone.utc)
    assert meta["sizeBytes"] == (image / "rootfs.ext4").stat().st_size
    assert 0 < meta["contentBytes"] < meta["sizeBytes"]
    assert meta["agent"] == {"version": guest_agent.AGENT_VERSION, "protocol": guest_agent.AGENT_PROTOCOL,
                             "sha256": load_builder().sha256_file(str(AGENT))}
    assert re.fullmatch(r"3\.\d+\.\d+", meta["python"]) and meta["debian"]
    assert meta["source"]["type"] == "debootstrap" and meta["source"]["variant"] == "minbase"
    assert "python3" in meta["source"]["include"].split(",")
    assert meta["kernel"] is None and meta["initramfs"] is None and re.fullmatch(r"[0-9a-f]{64}", meta["fingerprint"])
    # what it says is inside is: the agent, byte for byte, and the link points at the rootfs
    assert debugfs_cat(image / "rootfs.ext4", AGENT_IN_IMAGE) == AGENT.read_bytes()
    assert os.readlink(tmp_path / "rootfs.ext4") == f"images/{name}/rootfs.ext4"
    assert f"[image {name}] done: " in out
    assert not (REPO / "build" / "images" / name).exists()          # its scratch is gone


def test_rebuild_replaces_the_image_atomically_and_a_failed_one_changes_nothing(built, tmp_path):
    images, name, base, _out, _t0 = built
    image = images / name
    rootfs = image / "rootfs.ext4"
    common = ["--name", name, "--images-dir", images, "--build", REPO / "build", "--margin-mb", 8, *base]
    # unchanged input: up to date, nothing rewritten
    inode, meta = rootfs.stat().st_ino, (image / "image.json").read_text()
    r = builder(*common)
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
    assert rootfs.stat().st_ino == inode and (image / "image.json").read_text() == meta

    # a rebuild (with an own kernel) while a "VM" holds the old file open; a watcher sees at
    # every moment a whole ext4 at the path, the old one or the new one
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"an own kernel\n")
    held = open(rootfs, "rb")
    old_uuid = ext4_uuid(held)
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            try:
                with open(rootfs, "rb") as f:
                    seen.append((ext4_uuid(f), os.fstat(f.fileno()).st_size))
            except FileNotFoundError:
                seen.append(("missing", 0))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        r = builder(*common, "--force", "--kernel", kernel)
    finally:
        stop.set()
        watcher.join(10)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(rootfs, "rb") as f:
        new_uuid = ext4_uuid(f)
    assert new_uuid != old_uuid and ext4_uuid(held) == old_uuid      # the held file is still the old image
    assert {u for u, _ in seen} <= {old_uuid, new_uuid} and ("missing", 0) not in seen, set(seen)
    new_meta = json.loads((image / "image.json").read_text())
    assert new_meta["kernel"] == "vmlinuz" and (image / "vmlinuz").read_bytes() == kernel.read_bytes()
    assert new_meta["sizeBytes"] == rootfs.stat().st_size
    held.close()

    # a build that fails its check (an agent that does not compile): the image stays as it was
    bad = tmp_path / "guest_agent.py"
    bad.write_text(AGENT.read_text() + "\ndef broken(:\n")
    before = {n: (image / n).read_bytes() for n in ("image.json", "vmlinuz")}
    inode = rootfs.stat().st_ino
    r = builder(*common, "--agent", bad)
    assert r.returncode == 1 and "check inside the root filesystem failed" in r.stderr, r.stdout + r.stderr
    assert rootfs.stat().st_ino == inode and {n: (image / n).read_bytes() for n in before} == before
    assert sorted(os.listdir(image)) == [".build.lock", "image.json", "rootfs.ext4", "vmlinuz"]
    assert not (REPO / "build" / "images" / name).exists()

    # the same failure for a new image: nothing of it is left
    r = builder(*common[:1], name + "-new", *common[2:], "--agent", bad)
    assert r.returncode == 1 and not (images / (name + "-new")).exists()


def test_a_second_build_of_the_same_image_is_refused_while_one_runs(tmp_path):
    base = need_base()
    images, name = tmp_path / "images", unique("imgt")
    (images / name).mkdir(parents=True)
    lock = open(images / name / ".build.lock", "w")
    import fcntl
    fcntl.flock(lock, fcntl.LOCK_EX)            # as a running build holds it
    try:
        r = builder("--name", name, "--images-dir", images, "--build", REPO / "build", *base, timeout=120)
    finally:
        lock.close()
    assert r.returncode == 1 and f"another build of image {name} is running" in r.stderr, r.stderr
    assert os.listdir(images / name) == [".build.lock"]
