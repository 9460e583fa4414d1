"""The air-gap bundle (issue 22): `make dist`'s tarball, built here by its packing step
(dist-pack: `make dist` without building the images) from small stand-in images, unpacked into
an empty folder, and every command README's "Air-gapped hosts" promises for it run there:
make verify (and a damaged copy failing it, each bad file named), ./cbox.py --version,
preflight, check-config, openapi, make install into a DESTDIR and make uninstall. Targets that
need the source checkout stop in one line; the demo hint sends nobody in a circle. Also the
commit: stamped in a bundle, HEAD in a git checkout, "unknown" in a plain copy, and in
GET /v1/health."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from test_install import (IMAGES, INSTALLED, files_under, make, stamped_commit, without_commit, write_named_images,
                          write_standin_images)

sys.path.insert(0, str(REPO))
import cbox  # noqa: E402

DIST_NAME = "cbox-test"
BUNDLE_FILES = ["Makefile", "README.md", "SHA256SUMS", "cbox.py", "config.yaml", "guest_agent.py",
                "out/initramfs.cpio.gz", "out/kernel.release", "out/rootfs.ext4", "out/vmlinuz",
                "service/cbox.in", "service/cbox.service.in"]
# the Makefile's CHECKOUT_ONLY: what needs tests/, bench/ or the image builders
CHECKOUT_ONLY = ["test", "bench", "demo", "images", "kernel", "initramfs", "rootfs", "dist", "dist-pack", "dist-stage"]


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    """(the tarball, what dist-pack printed), made once for this module."""
    root = tmp_path_factory.mktemp("dist")
    out = write_standin_images(root / "out")
    printed = make("dist-pack", f"OUT={out}", f"BUILD={root / 'build'}", f"DIST_NAME={DIST_NAME}")
    assert not (root / "build" / "dist").exists()          # the staging tree is gone
    (tar,) = out.glob(f"{DIST_NAME}-*.tar.gz")
    return tar, printed


@pytest.fixture
def bundle(tarball, tmp_path):
    """The tarball unpacked into an empty folder; the bundle's root."""
    where = tmp_path / "unpacked"
    where.mkdir()
    subprocess.run(["tar", "-xzf", str(tarball[0]), "-C", str(where)], check=True, timeout=120)
    (root,) = where.iterdir()
    return root


def run(bundle, *args):
    """A command in the bundle's folder, as the README shows it."""
    return subprocess.run(list(args), cwd=bundle, capture_output=True, text=True, timeout=120)


def make_in(bundle, *args):
    return run(bundle, "make", "--no-print-directory", "SYSTEMCTL=false", *args)


def printed_sum(text, label):
    """The 64 hex digits printed on the line that starts with `label`."""
    (line,) = [line for line in text.splitlines() if line.startswith(label)]
    return re.search(r"\b[0-9a-f]{64}\b", line).group(0)


def test_the_tarball_its_tree_and_the_checksum_beside_it(tarball):
    tar, printed = tarball
    names = subprocess.run(["tar", "-tzf", str(tar)], capture_output=True, text=True, check=True).stdout.split()
    top = tar.name.removesuffix(".tar.gz")
    assert re.fullmatch(rf"{DIST_NAME}-\d{{8}}", top)
    assert sorted(n.removeprefix(top + "/") for n in names if not n.endswith("/")) == BUNDLE_FILES
    # SHA256SUMS beside the tarball: sha256sum's own format, so `sha256sum -c` checks it there
    sums = tar.parent / "SHA256SUMS"
    assert sums.read_text() == f"{printed_sum(printed, '[dist] sha256 of the tarball')}  {tar.name}\n"
    r = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tar.parent, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"{tar.name}: OK\n"


def test_verify_passes_on_the_bundle_as_built(bundle, tarball):
    r = make_in(bundle, "verify")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"[verify] OK: all {len(BUNDLE_FILES) - 1} files match SHA256SUMS, and no other file is here"
    # one value to compare across the air gap: the sum of SHA256SUMS, printed by both sides
    assert printed_sum(r.stdout, "[verify] sha256 of SHA256SUMS") == \
        printed_sum(tarball[1], "[dist] sha256 of its SHA256SUMS")
    assert lines[-1] == run(bundle, "./cbox.py", "--version").stdout.strip()
    # the bundle's SHA256SUMS is sha256sum's format too, every file in it
    r = run(bundle, "sha256sum", "-c", "SHA256SUMS")
    assert r.returncode == 0 and sorted(r.stdout.splitlines()) == [f"{n}: OK" for n in BUNDLE_FILES if n != "SHA256SUMS"]


def flip_a_byte_in_the_rootfs(bundle):
    with open(bundle / "out/rootfs.ext4", "r+b") as f:         # inside the sparse image's hole
        f.seek(32 * 1024 * 1024)
        f.write(b"\1")
    return ["out/rootfs.ext4: differs from the build"]


def edit_cbox_py(bundle):
    path = bundle / "cbox.py"
    path.write_text(path.read_text().replace('VERSION = "', 'VERSION = "9', 1))
    return ["cbox.py: differs from the build"]


def lose_an_image_and_add_a_hypervisor(bundle):
    (bundle / "out/vmlinuz").unlink()
    (bundle / "cloud-hypervisor").write_text("#!/bin/sh\n")      # `make install` would install it
    return ["out/vmlinuz: missing or unreadable", "cloud-hypervisor: not in SHA256SUMS"]


def drop_a_line_of_sha256sums(bundle):
    sums = bundle / "SHA256SUMS"
    sums.write_text("".join(line for line in sums.read_text().splitlines(True) if "guest_agent.py" not in line))
    return ["guest_agent.py: not in SHA256SUMS"]


def garble_sha256sums(bundle):
    sums = bundle / "SHA256SUMS"
    sums.write_text(re.sub(r"[0-9a-f](  guest_agent.py\n)", r"\1", sums.read_text()))   # 63 hex digits
    return ["SHA256SUMS: 1 line is improperly formatted", "guest_agent.py: not in SHA256SUMS"]


@pytest.mark.parametrize("damage", [flip_a_byte_in_the_rootfs, edit_cbox_py, lose_an_image_and_add_a_hypervisor,
                                    drop_a_line_of_sha256sums, garble_sha256sums])
def test_verify_names_each_file_that_is_not_as_built(bundle, damage):
    named = damage(bundle)
    r = make_in(bundle, "verify")
    assert r.returncode != 0 and "[verify] OK" not in r.stdout
    reported = [line for line in r.stderr.splitlines() if line.startswith("[verify] ")]
    assert sorted(reported[:-1]) == sorted(f"[verify] {n}" for n in named), r.stderr
    assert reported[-1].startswith("[verify] FAILED: ")


def test_version_is_stamped_into_the_bundle(bundle):
    commit = stamped_commit()
    r = run(bundle, "./cbox.py", "--version")
    assert r.returncode == 0 and r.stdout == f"cbox.py {cbox.VERSION} commit {commit}\n"
    # the stamps are the only differences from the checkout's files
    assert without_commit((bundle / "cbox.py").read_text()) == without_commit((REPO / "cbox.py").read_text())
    bundled, source = ((p / "Makefile").read_text().splitlines() for p in (bundle, REPO))
    assert [(a, b) for a, b in zip(bundled, source) if a != b] == [("BUNDLE := yes", "BUNDLE :=")]
    assert len(bundled) == len(source)


def test_what_the_readme_promises_works_in_the_bundle(bundle, tmp_path):
    r = run(bundle, "./cbox.py", "check-config")
    assert r.returncode == 0, r.stderr
    printed = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert printed["kernel"] == "'out/vmlinuz'" and printed["rootfs"] == "'out/rootfs.ext4'"
    r = run(bundle, "./cbox.py", "openapi")
    assert r.returncode == 0 and json.loads(r.stdout)["info"]["version"] == cbox.VERSION
    # preflight: what it says depends on this host, but it says it plainly and never points
    # at a demo this copy does not have
    r = run(bundle, "./cbox.py", "preflight")
    assert r.returncode in (0, 1) and all(line.startswith("cbox: ") for line in r.stderr.splitlines())
    assert "`make demo`" not in r.stderr or "`make demo` in CBox's source checkout" in r.stderr
    assert (r.returncode == 0) == (r.stderr == "")

    dest = tmp_path / "dest"
    out = make("install", f"DESTDIR={dest}", where=bundle)
    assert files_under(dest) == sorted(INSTALLED)
    lib = dest / "usr/local/lib/cbox"
    assert (lib / "cbox.py").read_bytes() == (bundle / "cbox.py").read_bytes()     # stamped once, at dist
    assert subprocess.run([str(lib / "cbox.py"), "--version"], capture_output=True, text=True).stdout == \
        run(bundle, "./cbox.py", "--version").stdout
    for name in (*IMAGES, "rootfs.ext4"):
        assert (dest / "var/lib/cbox/images" / name).read_bytes() == (bundle / "out" / name).read_bytes()
    assert "no images" not in out
    make("uninstall", f"DESTDIR={dest}", where=bundle)
    assert files_under(dest) == []
    assert make_in(bundle, "verify").returncode == 0       # nothing of that wrote into the bundle


def test_the_demo_hint_points_where_the_demo_is(bundle, tmp_path):
    """No circle: without a hypervisor, preflight in a bundle sends the user to the source
    checkout, and the bundle's `make demo` says the same; a checkout's preflight says `make demo`."""
    config = tmp_path / "config.yaml"
    config.write_text((bundle / "config.yaml").read_text().replace(
        'chv_bin: "/usr/local/bin/cloud-hypervisor"', f'chv_bin: "{tmp_path}/no-hypervisor"'))
    hint = "cloud-hypervisor binary not found"
    bundled = run(bundle, "./cbox.py", "preflight", "--config", str(config))
    (line,) = [line for line in bundled.stderr.splitlines() if hint in line]
    assert bundled.returncode == 1 and line.endswith(
        "or try `make demo` in CBox's source checkout (this copy has no stand-in hypervisor)")
    demo = make_in(bundle, "demo")
    assert demo.returncode != 0 and "stand-in hypervisor" in demo.stderr and "source checkout" in demo.stderr
    checkout = subprocess.run([sys.executable, str(REPO / "cbox.py"), "preflight", "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
    (line,) = [line for line in checkout.stderr.splitlines() if hint in line]
    assert line.endswith("or try `make demo`")


def test_a_bundle_offers_only_what_works_there(bundle):
    r = make_in(bundle, "help")
    assert r.returncode == 0
    offered = set(re.findall(r"\bmake ([a-z][a-z-]*)", r.stdout))
    assert offered == {"verify", "check-host", "run", "install", "uninstall"}
    for target in offered:                          # each exists (check-host and run need KVM: not run here)
        assert make_in(bundle, "-n", target).returncode == 0, target
    assert "images" not in make_in(bundle, "-n", "run").stdout      # the bundle's images are in out/ already
    for target in CHECKOUT_ONLY:
        r = make_in(bundle, target)
        lines = r.stderr.splitlines()
        assert r.returncode != 0 and len(lines) == 1 and f"make {target}: " in lines[0], (target, r.stderr)
        assert "source checkout" in lines[0] and r.stdout == ""
    assert make_in(bundle, "verify").returncode == 0      # none of them touched the bundle


def pack(tmp_path, out, *args):
    """make dist-pack of out with args; (exit status, the unpacked bundle's root or None, stderr)."""
    r = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "dist-pack", f"OUT={out}",
                        f"BUILD={tmp_path / 'build'}", f"DIST_NAME={DIST_NAME}", *args],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return r.returncode, None, r.stderr
    (tar,) = out.glob(f"{DIST_NAME}-*.tar.gz")
    where = tmp_path / "unpacked"
    where.mkdir()
    subprocess.run(["tar", "-xzf", str(tar), "-C", str(where)], check=True, timeout=120)
    tar.unlink()
    (root,) = where.iterdir()
    return 0, root, r.stderr


def files_of(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def test_dist_bundles_the_named_images(tmp_path):
    """make dist packs every built image (IMAGES= names some; the config's default always goes
    along), their published files only, out/rootfs.ext4 still the link to "default"; the
    bundle verifies; a name that is not built stops the pack, saying what is."""
    out = write_named_images(tmp_path / "out")
    status, root, err = pack(tmp_path, out)
    assert status == 0, err
    images = ["out/images/default/image.json", "out/images/default/rootfs.ext4", "out/images/py/image.json",
              "out/images/py/rootfs.ext4", "out/images/py/vmlinuz"]
    assert files_of(root) == sorted(BUNDLE_FILES + images)
    assert os.readlink(root / "out/rootfs.ext4") == "images/default/rootfs.ext4"
    assert (root / "out/rootfs.ext4").read_bytes()[:7] == b"default"
    assert (root / "out/images/py/rootfs.ext4").stat().st_blocks * 512 < 1 << 20       # still sparse
    assert make_in(root, "verify").returncode == 0
    (root / "out/images/py/vmlinuz").write_bytes(b"swapped\n")
    r = make_in(root, "verify")
    assert r.returncode != 0 and "[verify] out/images/py/vmlinuz: differs from the build" in r.stderr

    shutil.rmtree(tmp_path / "unpacked")
    status, root, err = pack(tmp_path, out, "IMAGES=py")
    assert status == 0, err
    assert files_of(root) == sorted(BUNDLE_FILES + images)          # py named, default as the config's rootfs
    shutil.rmtree(tmp_path / "unpacked")
    (out / "rootfs.ext4").unlink()
    (out / "rootfs.ext4").write_bytes(b"a rootfs of before image directories")
    status, root, err = pack(tmp_path, out, "IMAGES=py")
    assert status == 0, err
    assert files_of(root) == sorted(BUNDLE_FILES + images[2:])
    assert not (root / "out/rootfs.ext4").is_symlink()
    shutil.rmtree(tmp_path / "unpacked")

    status, root, err = pack(tmp_path, out, "IMAGES=py nope")
    assert status != 0 and 'make dist: no image "nope" in ' in err and "(built: default py)" in err, err
    assert not list(out.glob(f"{DIST_NAME}-*.tar.gz"))


def test_verify_outside_a_bundle_says_what_it_checks(tmp_path):
    r = subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "verify"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no SHA256SUMS here" in r.stderr


# ---- the commit ------------------------------------------------------------------------------

HEAD = "0123456789abcdef0123456789abcdef01234567"


def git_dir(path, head, **files):
    """A .git directory's HEAD and other files (name with '/' as '__')."""
    path.mkdir(parents=True)
    (path / "HEAD").write_text(head + "\n")
    for name, text in files.items():
        target = path / name.replace("__", "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return path


def test_git_head_commit_reads_the_checkouts_files(tmp_path):
    loose = tmp_path / "loose"
    git_dir(loose / ".git", "ref: refs/heads/main", refs__heads__main=HEAD + "\n")
    assert cbox.git_head_commit(loose) == HEAD
    packed = tmp_path / "packed"
    git_dir(packed / ".git", "ref: refs/heads/main",
            packed_refs=f"# pack-refs with: peeled\n{'f' * 40} refs/heads/other\n{HEAD} refs/heads/main\n")
    (packed / ".git/packed_refs").rename(packed / ".git/packed-refs")
    assert cbox.git_head_commit(packed) == HEAD
    detached = tmp_path / "detached"
    git_dir(detached / ".git", HEAD)
    assert cbox.git_head_commit(detached) == HEAD
    # a linked worktree: .git is a file naming its git dir, the branch is in the common dir
    worktree = tmp_path / "wt"
    worktree.mkdir()
    git_dir(loose / ".git/worktrees/wt", "ref: refs/heads/main", commondir="../..\n")
    (worktree / ".git").write_text(f"gitdir: {loose / '.git/worktrees/wt'}\n")
    assert cbox.git_head_commit(worktree) == HEAD
    # not a checkout, a branch without a commit yet, garbage: None
    assert cbox.git_head_commit(tmp_path) is None
    unborn = tmp_path / "unborn"
    git_dir(unborn / ".git", "ref: refs/heads/main")
    assert cbox.git_head_commit(unborn) is None
    garbage = tmp_path / "garbage"
    git_dir(garbage / ".git", "not a commit")
    assert cbox.git_head_commit(garbage) is None


def test_version_of_a_checkout_and_of_a_plain_copy(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "cbox.py"), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"cbox.py {cbox.VERSION} commit {cbox.build_commit()}\n"
    if shutil.which("git") and (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode == 0:
            assert cbox.build_commit() == head.stdout.strip()
    shutil.copy(REPO / "cbox.py", tmp_path / "cbox.py")
    r = subprocess.run([sys.executable, str(tmp_path / "cbox.py"), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"cbox.py {cbox.VERSION} commit unknown\n"


def test_health_shows_the_version_and_commit(cbox_server):
    status, body = cbox_server.api.get("/v1/health")
    assert status == 200 and (body["version"], body["commit"]) == (cbox.VERSION, cbox.build_commit())
    assert re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}|unknown", body["commit"])
