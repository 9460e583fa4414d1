"""Installing CBox as a systemd service (issue 13): `make install` / `make uninstall`
into a DESTDIR, the unit checked by systemd-analyze, and cbox.py's sd_notify
protocol (READY=1 once serving and adopted, STOPPING=1 on SIGTERM)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, socket_in_netns, unique

import cbox  # noqa: E402

IMAGES = {"vmlinuz": b"kernel\n", "initramfs.cpio.gz": b"initramfs\n", "kernel.release": b"6.1.0\n"}


def make(*args, where=REPO):
    """make in the repository (or `where`); returns its stdout. SYSTEMCTL=false: a daemon-reload would fail."""
    r = subprocess.run(["make", "--no-print-directory", "-C", str(where), "SYSTEMCTL=false", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def stamped_commit():
    """The commit `make install` and `make dist` stamp into cbox.py: this checkout's HEAD, with
    -dirty when git shows uncommitted changes (or cannot tell)."""
    commit = cbox.git_head_commit(REPO)
    if not commit:
        return "unknown"
    try:
        clean = subprocess.run(["git", "-c", f"safe.directory={REPO}", "-C", str(REPO), "diff", "--quiet", "HEAD", "--"], timeout=60).returncode == 0
    except OSError:
        clean = False
    return commit if clean else commit + "-dirty"


def without_commit(text):
    """cbox.py's text without its COMMIT line (the one line install and dist stamp)."""
    return [line for line in text.splitlines() if not line.startswith("COMMIT = ")]


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if not p.is_dir())


def write_standin_images(out):
    """Built images stand-ins in `out`, the rootfs sparse as the real one is."""
    out.mkdir()
    for name, data in IMAGES.items():
        (out / name).write_bytes(data)
    with open(out / "rootfs.ext4", "wb") as f:
        f.write(b"rootfs")
        f.truncate(64 * 1024 * 1024)
    return out


def write_named_images(out):
    """Stand-ins of built named images in out/images (issue 20): "default" (out/rootfs.ext4
    links to it), "py" with its own kernel, and "wip", a build that has not published yet."""
    write_standin_images(out)
    (out / "rootfs.ext4").unlink()
    for name, extra in (("default", {}), ("py", {"vmlinuz": b"py kernel\n"})):
        image = out / "images" / name
        image.mkdir(parents=True)
        with open(image / "rootfs.ext4", "wb") as f:
            f.write(name.encode())
            f.truncate(32 << 20)
        (image / "image.json").write_text(json.dumps({"name": name, "rootfs": "rootfs.ext4"}))
        (image / ".build.lock").write_text("")
        for file, data in extra.items():
            (image / file).write_bytes(data)
    (out / "images" / "wip").mkdir()
    (out / "images" / "wip" / "rootfs.ext4.tmp").write_bytes(b"half")
    (out / "rootfs.ext4").symlink_to("images/default/rootfs.ext4")
    return out


@pytest.fixture
def out_dir(tmp_path):
    return write_standin_images(tmp_path / "out")


INSTALLED = ["etc/cbox/config.yaml", "etc/cbox/config.yaml.default", "etc/systemd/system/cbox.service",
             "usr/local/bin/cbox", "usr/local/lib/cbox/cbox.py", "usr/local/lib/cbox/guest_agent.py",
             "var/lib/cbox/images/initramfs.cpio.gz", "var/lib/cbox/images/kernel.release",
             "var/lib/cbox/images/rootfs.ext4", "var/lib/cbox/images/vmlinuz"]


def test_install_into_destdir(tmp_path, out_dir):
    dest = tmp_path / "dest"
    make("install", f"DESTDIR={dest}", f"OUT={out_dir}")
    assert files_under(dest) == sorted(INSTALLED)
    lib = dest / "usr/local/lib/cbox"
    installed = (lib / "cbox.py").read_text()      # the checkout's cbox.py, its commit stamped
    assert without_commit(installed) == without_commit((REPO / "cbox.py").read_text())
    assert f'\nCOMMIT = "{stamped_commit()}"  ' in installed
    assert (lib / "guest_agent.py").read_bytes() == (REPO / "guest_agent.py").read_bytes()
    assert os.access(lib / "cbox.py", os.X_OK) and os.access(dest / "usr/local/bin/cbox", os.X_OK)
    wrapper = (dest / "usr/local/bin/cbox").read_text()
    assert "/usr/local/lib/cbox/cbox.py" in wrapper and "/etc/cbox/config.yaml" in wrapper
    assert str(dest) not in wrapper            # DESTDIR is where files go, not what they name

    images = dest / "var/lib/cbox/images"
    for name in (*IMAGES, "rootfs.ext4"):
        assert (images / name).read_bytes() == (out_dir / name).read_bytes()
    assert os.stat(images / "rootfs.ext4").st_blocks * 512 < 1024 * 1024     # copied sparse

    # the installed config names the installed paths, all absolute, and loads
    cfg = cbox.load_config(dest / "etc/cbox/config.yaml")
    assert cfg.state_dir == "/var/lib/cbox" and cfg.run_dir == "/run/cbox"
    assert (cfg.kernel, cfg.initramfs, cfg.rootfs) == tuple(
        f"/var/lib/cbox/images/{n}" for n in ("vmlinuz", "initramfs.cpio.gz", "rootfs.ext4"))
    assert cfg.images_dir == "/var/lib/cbox/images"              # the named images, beside them
    assert cfg.host == "127.0.0.1" and not cfg.destroy_on_exit
    for key in ("state_dir", "run_dir", "chv_bin", "kernel", "initramfs", "rootfs", "callback_secret_file"):
        value = getattr(cfg, key)
        assert not value or os.path.isabs(value), (key, value)

    unit = (dest / "etc/systemd/system/cbox.service").read_text()
    for line in ("Type=notify", "KillMode=process", "Restart=on-failure", "OOMPolicy=continue",
                 "ExecStart=/usr/local/bin/cbox serve --config /etc/cbox/config.yaml"):
        assert f"\n{line}\n" in unit, line
    assert "@" not in unit.replace("\n#", "")      # every placeholder substituted


def test_install_takes_the_named_images(tmp_path):
    """The built images of out/images go to /var/lib/cbox/images/NAME/ (a half-built one does
    not), rootfs.ext4 there links to the image default as out/rootfs.ext4 does; a reinstall over
    a running VM's image renames over it (the VM's open file stays); uninstall takes them away."""
    out = write_named_images(tmp_path / "out")
    dest = tmp_path / "dest"
    make("install", f"DESTDIR={dest}", f"OUT={out}")
    images = dest / "var/lib/cbox/images"
    named = ["default/image.json", "default/rootfs.ext4", "py/image.json", "py/rootfs.ext4", "py/vmlinuz"]
    assert files_under(dest) == sorted(INSTALLED + [f"var/lib/cbox/images/{n}" for n in named])
    assert os.readlink(images / "rootfs.ext4") == "default/rootfs.ext4"
    for n in named:
        assert (images / n).read_bytes() == (out / "images" / n).read_bytes(), n
    assert os.stat(images / "py/rootfs.ext4").st_blocks * 512 < 1 << 20         # copied sparse

    held = open(images / "py/rootfs.ext4", "rb")
    with open(out / "images/py/rootfs.ext4", "r+b") as f:
        f.write(b"py2")
    make("install", f"DESTDIR={dest}", f"OUT={out}")
    assert (images / "py/rootfs.ext4").read_bytes()[:3] == b"py2" and held.read(2) == b"py"
    held.close()

    make("uninstall", f"DESTDIR={dest}")
    assert files_under(dest) == []


def test_reinstall_keeps_the_config_and_uninstall_removes_what_install_put(tmp_path, out_dir):
    dest = tmp_path / "dest"
    make("install", f"DESTDIR={dest}", f"OUT={out_dir}")
    config = dest / "etc/cbox/config.yaml"
    edited = config.read_text().replace("port: 7000", "port: 7100")
    config.write_text(edited)
    (dest / "etc/cbox/config.yaml.default").write_text("stale\n")
    out = make("install", f"DESTDIR={dest}", f"OUT={out_dir}")
    assert "kept" in out and config.read_text() == edited
    assert (dest / "etc/cbox/config.yaml.default").read_text() != "stale\n"     # the shipped one, refreshed
    vm_state = dest / "var/lib/cbox/vms/keep/vm.json"                        # VM state is not install's
    vm_state.parent.mkdir(parents=True)
    vm_state.write_text("{}")

    out = make("uninstall", f"DESTDIR={dest}")
    assert files_under(dest) == ["etc/cbox/config.yaml", "var/lib/cbox/vms/keep/vm.json"], out
    assert "kept" in out and not (dest / "usr/local/lib/cbox").exists()

    # an unchanged config goes with the rest: nothing of CBox is left
    fresh = tmp_path / "fresh"
    make("install", f"DESTDIR={fresh}", f"OUT={out_dir}")
    make("uninstall", f"DESTDIR={fresh}")
    assert files_under(fresh) == []
    for gone in ("usr/local/lib/cbox", "etc/cbox", "var/lib/cbox"):
        assert not (fresh / gone).exists(), gone


def test_prefix_and_directories_are_honoured(tmp_path, out_dir):
    root = tmp_path / "root"
    make("install", f"PREFIX={root}/opt", f"CONFDIR={root}/conf", f"STATEDIR={root}/state",
         f"UNITDIR={root}/units", f"OUT={tmp_path / 'no-images'}")
    assert files_under(root) == ["conf/config.yaml", "conf/config.yaml.default", "opt/bin/cbox",
                                 "opt/lib/cbox/cbox.py", "opt/lib/cbox/guest_agent.py", "units/cbox.service"]
    unit = (root / "units/cbox.service").read_text()
    assert f"ExecStart={root}/opt/bin/cbox serve --config {root}/conf/config.yaml\n" in unit
    # the installed command runs the installed cbox.py with the installed config
    r = subprocess.run([str(root / "opt/bin/cbox"), "check-config"], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, CBOX_CONFIG=""), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    printed = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert printed["state_dir"] == repr(f"{root}/state")
    assert printed["kernel"] == repr(f"{root}/state/images/vmlinuz")
    make("uninstall", f"PREFIX={root}/opt", f"CONFDIR={root}/conf", f"STATEDIR={root}/state",
         f"UNITDIR={root}/units")
    assert files_under(root) == []


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package; .ci/run installs it)")
    root = tmp_path / "root"
    # installed for real into a temporary prefix: verify checks that ExecStart exists
    make("install", f"PREFIX={root}/usr", f"CONFDIR={root}/etc", f"STATEDIR={root}/var",
         f"UNITDIR={root}/units", f"OUT={tmp_path / 'no-images'}")
    unit = root / "units/cbox.service"

    def complaints(path):
        r = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
        return r.returncode, [line for line in (r.stdout + r.stderr).splitlines() if path.name in line]

    assert complaints(unit) == (0, [])
    # the check can fail: a misspelt key and a bad value are reported
    broken = root / "units/cbox-broken.service"
    broken.write_text(unit.read_text().replace("KillMode=process", "KillMode=procss")
                      .replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert len(complaints(broken)[1]) == 2


# ---- sd_notify ------------------------------------------------------------------------------

def launch(server, env):
    """cbox.py serve, without waiting for it to answer (start() would)."""
    server.logf = open(server.log_path, "ab")
    server.proc = server.ns.popen([sys.executable, str(REPO / "cbox.py"), "serve", "--config", str(server.config)],
                                  stdout=server.logf, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1", **env))
    return server


def notifications(sock, want, server, timeout=30.0):
    """Datagrams as {key: value} until one has `want`; fails if cbox.py exits first."""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
        except socket.timeout:
            assert server.proc.poll() is None, server.log()
            continue
        if want in fields:
            return fields
    raise AssertionError(f"no {want} from cbox.py within {timeout}s:\n{server.log()}")


def test_serve_notifies_ready_and_stopping(cbox_factory, tmp_path):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        server = launch(cbox_factory(), {"NOTIFY_SOCKET": str(path)})
        ready = notifications(sock, "READY", server)
        assert ready["READY"] == "1" and "0 VM(s) adopted" in ready["STATUS"]
        assert server.api.get("/v1/health", timeout=5)[0] == 200     # READY came once it listens
        vm = server.api.start_vm("kept")
        vmm = server.vmm_pids()
        assert len(vmm) == 1
        environ = Path(f"/proc/{vmm[0]}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith(b"NOTIFY_SOCKET=") for v in environ)      # not passed on to the VMM
        server.proc.send_signal(signal.SIGTERM)
        assert notifications(sock, "STOPPING", server)["STOPPING"] == "1"
        assert server.proc.wait(20) == 0
        server.logf.close()
        assert server.vmm_pids() == vmm                 # SIGTERM leaves VMs running (a service restart)

        # the next start reports READY only once the running VM is adopted
        again = launch(cbox_factory(), {"NOTIFY_SOCKET": str(path)})
        ready = notifications(sock, "READY", again)
        assert "1 VM(s) adopted" in ready["STATUS"]
        status, body = again.api.get("/v1/vms/kept", timeout=5)
        assert status == 200 and body["status"] == "RUNNING" and body["cid"] == vm["cid"]
        assert again.api.delete("/v1/vms", timeout=60)[0] == 200
        again.assert_clean()


def test_serve_notifies_an_abstract_socket(cbox_factory, netns):
    name = unique("cbox-notify-")
    # abstract names live in a network namespace: bind it in cbox.py's
    sock = socket_in_netns(netns.name, socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        sock.bind("\0" + name)
        server = launch(cbox_factory(), {"NOTIFY_SOCKET": "@" + name})
        assert notifications(sock, "READY", server)["READY"] == "1"
        server.proc.send_signal(signal.SIGTERM)
        assert notifications(sock, "STOPPING", server)["STOPPING"] == "1"
        assert server.proc.wait(20) == 0


def test_serve_without_a_reachable_notify_socket_still_serves(cbox_factory, tmp_path):
    server = cbox_factory()
    server.start(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert server.api.get("/v1/health")[0] == 200
    assert "cannot notify systemd" in server.log()
    server.stop()
    assert server.proc.returncode == 0


def test_the_air_gap_tree_installs_with_its_bundled_hypervisor(tmp_path, out_dir):
    """`make dist` packs this tree (dist-stage): `make install` from it works, and a bundled
    cloud-hypervisor is installed beside cbox.py with the config's chv_bin naming it."""
    chv = tmp_path / "chv-build"
    chv.write_text("#!/bin/sh\necho stand-in\n")
    stage, dest = tmp_path / "cbox-dist", tmp_path / "dest"
    make("dist-stage", f"STAGE={stage}", f"OUT={out_dir}", f"CHV={chv}")
    assert (stage / "Makefile").exists() and (stage / "service" / "cbox.service.in").exists()
    assert 'chv_bin: "./cloud-hypervisor"' in (stage / "config.yaml").read_text()
    r = subprocess.run(["make", "--no-print-directory", "-C", str(stage), "SYSTEMCTL=false", "install",
                        f"DESTDIR={dest}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert files_under(dest) == sorted(INSTALLED + ["usr/local/lib/cbox/cloud-hypervisor"])
    installed_chv = dest / "usr/local/lib/cbox/cloud-hypervisor"
    assert installed_chv.read_text() == chv.read_text() and os.access(installed_chv, os.X_OK)
    config = cbox.load_config(str(dest / "etc/cbox/config.yaml"))
    assert config.chv_bin == "/usr/local/lib/cbox/cloud-hypervisor"
    assert config.rootfs == "/var/lib/cbox/images/rootfs.ext4"
    r = subprocess.run(["make", "--no-print-directory", "-C", str(stage), "SYSTEMCTL=false", "uninstall",
                        f"DESTDIR={dest}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert files_under(dest) == []
