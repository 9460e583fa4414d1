"""Tests of the stand-in hypervisor tests/fake_chv.py (CHV v53 API subset).

Every stand-in runs inside the per-test network namespace (conftest `netns`),
with its bridge and persistent tap there too; guest traffic stays inside
namespaces this test run creates.
"""
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import fake_chv
from procutil import proc_state, wait_for

STANDIN = Path(__file__).resolve().parent / "fake_chv.py"
REPO = Path(__file__).resolve().parents[1]
GUEST_IP = "10.77.0.2"
TAP = "cbtap0"
MAC = "52:54:00:ab:cd:ef"

TEST_AGENT = r'''
import json, os, socket, subprocess, sys
kv = dict(w.split("=", 1) for w in os.environ.get("CBOX_CMDLINE", "").split() if "=" in w)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
if "cbox.ip" in kv:
    subprocess.run(["ip", "addr", "add", kv["cbox.ip"], "dev", "eth0"], check=True)
    subprocess.run(["ip", "link", "set", "eth0", "up"], check=True)
socket.sethostname(kv.get("cbox.vm", "guest"))
def _echo_input():            # serial input (Socket mode) arrives on stdin
    for line in sys.stdin:
        print("test-agent: input:", line.rstrip(), flush=True)
import threading
threading.Thread(target=_echo_input, daemon=True).start()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 4031))
srv.listen(16)
print("test-agent: ready", flush=True)
while True:
    c, _ = srv.accept()
    with c, c.makefile("rb") as f:
        line = f.readline().decode().strip()
        if line == "info":
            link = subprocess.run(["ip", "-o", "link", "show", "eth0"], capture_output=True, text=True).stdout
            c.sendall(json.dumps({"hostname": socket.gethostname(), "env": dict(os.environ),
                                  "link": link}).encode() + b"\n")
        elif line.startswith("echo"):
            c.sendall(f.read(int(line.split()[1])))
        elif line.startswith("send"):
            c.sendall(bytes(int(line.split()[1])))
        elif line in ("reboot", "poweroff"):
            # reboot(2) in the guest's pid namespace (never in the host's: checked first)
            import ctypes
            nspid = [l for l in open("/proc/self/status") if l.startswith("NSpid:")][0].split()[1:]
            if len(nspid) < 2:
                c.sendall(b"refused: not in a child pid namespace\n")
                continue
            c.sendall(b"bye\n")
            c.close()
            print("test-agent: " + line, flush=True)
            ctypes.CDLL(None, use_errno=True).reboot(0x01234567 if line == "reboot" else 0x4321FEDC)
        elif line.startswith("burn"):
            # N busy processes for S seconds: the CPU they got, and this process's cgroups
            import time
            _, n, secs = line.split()
            t0 = time.monotonic()
            busy = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(int(n))]
            time.sleep(float(secs))
            for p in busy:
                p.kill()
            for p in busy:
                p.wait()
            wall, t = time.monotonic() - t0, os.times()
            c.sendall(json.dumps({"cpu": t.children_user + t.children_system, "wall": wall,
                                  "cgroup": open("/proc/self/cgroup").read()}).encode() + b"\n")
        elif line.startswith("exit"):
            c.sendall(b"bye\n")
            c.close()
            sys.exit(int(line.split()[1]))
'''


# ---- helpers ---------------------------------------------------------------

class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class StandIn:
    """One fake_chv.py process inside the test namespace."""

    def __init__(self, ns, workdir, name="vm", extra_env=None, args=None, wrapper=(), wait=True, **popen_kw):
        self.ns, self.dir, self.name = ns, Path(workdir), name
        self.api_sock = str(self.dir / f"{name}.api")
        self.vsock = str(self.dir / f"{name}.vsock")
        self.serial = self.dir / f"{name}.serial"
        self.log_file = self.dir / f"{name}.log"
        self.out_file = self.dir / f"{name}.out"
        env = dict(os.environ, CBOX_GUEST_AGENT=str(self.dir / "agent.py"))
        env.update(extra_env or {})
        args = args or ["--api-socket", f"path={self.api_sock}", "--log-file", str(self.log_file), "-v"]
        self.out = open(self.out_file, "wb")
        self.proc = ns.popen([*wrapper, sys.executable, str(STANDIN), *args], stdout=self.out,
                             stderr=subprocess.STDOUT, env=env, **popen_kw)
        self._conn = None
        if wait:
            self.wait_api()

    def wait_api(self):
        deadline = time.monotonic() + 10
        while True:                     # a stale socket file may exist: wait for an answer
            assert self.proc.poll() is None, f"stand-in exited {self.proc.returncode}: {self.output()}"
            assert time.monotonic() < deadline, "stand-in did not answer on its API socket"
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(self.api_sock)
                break
            except OSError:
                time.sleep(0.01)

    def output(self):
        text = self.out_file.read_text(errors="replace") if self.out_file.exists() else ""
        if self.log_file.exists():
            text += "\n--- log ---\n" + self.log_file.read_text(errors="replace")
        return text

    def request(self, method, endpoint, body=None, raw=None, headers=None, keep=False):
        """(status, parsed JSON body or None); keep=True reuses one keep-alive connection."""
        conn = self._conn if keep and self._conn else UnixHTTPConnection(self.api_sock)
        hdrs = dict(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None and body is not None:
            hdrs.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, f"/api/v1/{endpoint}", body=data, headers=hdrs)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            if keep:
                self._conn = conn
            else:
                conn.close()
        return resp.status, (json.loads(payload) if payload else None)

    def put(self, endpoint, body=None, **kw):
        return self.request("PUT", endpoint, body, **kw)

    def get(self, endpoint, **kw):
        return self.request("GET", endpoint, **kw)

    def config(self, net=True, cmdline=None, **over):
        cmd = cmdline or f"console=ttyS0 cbox.vm={self.name} cbox.ip={GUEST_IP}/24 cbox.gw=10.77.0.1"
        cfg = {
            "payload": {"kernel": str(self.dir / "vmlinux"), "initramfs": str(self.dir / "initrd"), "cmdline": cmd},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 256 << 20},
            "disks": [{"path": str(self.dir / "rootfs.img"), "readonly": True, "num_queues": 1, "id": "disk0"}],
            "vsock": {"cid": 3, "socket": self.vsock},
            "serial": {"mode": "File", "file": str(self.serial)},
            "console": {"mode": "Off"},
            "rng": {"src": "/dev/urandom"},
        }
        if net:
            cfg["net"] = [{"tap": TAP, "mac": MAC, "num_queues": 2, "id": "net0"}]
        cfg.update(over)
        return cfg

    def state(self):
        status, info = self.get("vm.info")
        return info["state"] if status == 200 else status

    def wait_exit(self, timeout=10):
        return self.proc.wait(timeout)

    def kill(self):
        if self._conn:
            self._conn.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.out.close()


@pytest.fixture
def env(netns):
    """Short work dir (socket paths <= 107 bytes), payload files, test agent; kills stand-ins."""
    work = Path(tempfile.mkdtemp(prefix="cbs", dir="/tmp"))
    for name in ("vmlinux", "initrd", "rootfs.img"):
        (work / name).write_bytes(b"stand-in payload\n")
    (work / "agent.py").write_text(TEST_AGENT)
    made = []

    class Env:
        ns = netns
        dir = work

        @staticmethod
        def standin(name="vm", **kw):
            s = StandIn(netns, work, name, **kw)
            made.append(s)
            return s

        @staticmethod
        def bridge():
            netns.bridge_with_tap(TAP, "10.77.0.1/24")

    try:
        yield Env
    finally:
        for s in made:
            try:
                s.kill()
            except Exception:
                pass
        wait_gone(lambda: agent_pids(work), 5)
        shutil.rmtree(work, ignore_errors=True)


def wchan(pid):
    """Where in the kernel a process waits (/proc/<pid>/wchan): "wait_for_partner" for the
    open() of a FIFO without a peer, "inet_csk_accept" for accept(); None when it is gone."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return None


def running(pid):
    """Exists and is not a zombie (orphaned zombies wait for this machine's init to reap them)."""
    return proc_state(pid) not in ("Z", "X", None)


def agent_pids(workdir):
    """Host pids of live processes running this test's agent script."""
    needle = str(Path(workdir) / "agent.py").encode()
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if needle in Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0") and running(int(name)):
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def wait_gone(fn, timeout):
    deadline = time.monotonic() + timeout
    while fn() and time.monotonic() < deadline:
        time.sleep(0.02)
    return fn()


def guest_info(ns, standin=None, timeout=10.0):
    """Ask the test agent over the bridge + tap (retrying until the guest is up).

    Waiting for the agent's ready line on the serial console first avoids
    a SYN or ARP sent before eth0 is up, which costs a 1 s retransmission."""
    deadline = time.monotonic() + timeout
    while standin is not None and b"test-agent: ready" not in standin.serial.read_bytes():
        assert time.monotonic() < deadline, standin.output()
        time.sleep(0.01)
    while True:
        try:
            sock = ns.connect((GUEST_IP, 4031), timeout=2)
            with sock:
                sock.sendall(b"info\n")
                return json.loads(sock.makefile("rb").readline())
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def host_veths(ns):
    """The stand-in side of guests' veth pairs (kernel relay) in the namespace."""
    return re.findall(r"^\d+: (cbveth\d+)[@:]", ns.links(), re.M)


def tap_clsact(ns):
    if not shutil.which("tc"):
        pytest.skip("tc (iproute2) is not installed")
    return "clsact" in ns.run("tc", "qdisc", "show", "dev", TAP).stdout


def tap_fd_packets(ns):
    """Frames the tap's fd has seen (tun counts those read or written there)."""
    stats = json.loads(ns.run("ip", "-s", "-j", "link", "show", TAP).stdout)[0]["stats64"]
    return stats["rx"]["packets"] + stats["tx"]["packets"]


def echo(ns, size, timeout=10):
    """Send `size` bytes to the test agent and read them back (TCP both ways over the tap)."""
    data = os.urandom(size)
    with ns.connect((GUEST_IP, 4031), timeout=timeout) as c:
        c.sendall(f"echo {size}\n".encode() + data)
        got = b""
        while len(got) < size:
            chunk = c.recv(1 << 20)
            if not chunk:
                break
            got += chunk
    return got == data


def vsock_connect(path, port):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(f"CONNECT {port}\n".encode())
    return s


def read_line(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


# ---- command line ------------------------------------------------------------

def test_command_line():
    r = subprocess.run([sys.executable, str(STANDIN), "--bogus"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "--bogus" in r.stderr
    r = subprocess.run([sys.executable, str(STANDIN), "-v"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "--api-socket" in r.stderr
    r = subprocess.run([str(STANDIN), "--version"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and "v53" in r.stdout
    assert fake_chv.parse_args(["--api-socket=path=/x", "-vv", "-v", "--log-file", "/l"]) == \
        {"api": "path=/x", "log_file": "/l", "verbose": 3, "event_monitor": None}
    assert fake_chv.parse_args(["--api-socket", "/x", "--event-monitor=path=/e"])["event_monitor"] == "path=/e"
    assert fake_chv.parse_api_socket("path=/x/api.sock") == ("/x/api.sock", None)
    assert fake_chv.parse_api_socket("/x/api.sock") == ("/x/api.sock", None)
    assert fake_chv.parse_api_socket("fd=3") == (None, 3)


# ---- schema validation (unit) ------------------------------------------------

def test_schema_validator(chv_schema):
    v = fake_chv.SchemaValidator.load(chv_schema)
    good = {
        "payload": {"kernel": "/k", "initramfs": "/i", "cmdline": "x"},
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 1 << 30},
        "disks": [{"path": "/d", "readonly": False, "num_queues": 1, "id": "d0"}],
        "net": [{"tap": "t0", "mac": MAC, "num_queues": 2, "id": "n0"}],
        "vsock": {"cid": 3, "socket": "/v"},
        "serial": {"mode": "File", "file": "/s"},
        "console": {"mode": "Off"},
        "rng": {"src": "/dev/urandom"},
    }
    assert v.validate(good) == []
    bad = json.loads(json.dumps(good))
    bad["cpus"]["bootvcpus"] = 1
    bad["net"][0]["macc"] = MAC
    bad["disks"][0]["readonly"] = 1            # integer is not boolean
    bad["memory"]["size"] = True               # boolean is not integer
    bad["serial"]["mode"] = "file"             # enum is case sensitive
    bad["vsock"]["cid"] = 2                    # minimum 3
    bad["net"][0]["pci_segment"] = 1 << 20     # int16
    bad["vsock"]["socket"] = 5
    bad["tpyo"] = {}
    errors = v.validate(bad)
    joined = "\n".join(errors)
    for path in ("$.cpus.bootvcpus", "$.net[0].macc", "$.disks[0].readonly", "$.memory.size",
                 "$.serial.mode", "$.vsock.cid", "$.net[0].pci_segment", "$.vsock.socket", "$.tpyo"):
        assert path in joined, (path, errors)
    assert len(errors) == 9, errors
    missing = v.validate({"cpus": {"boot_vcpus": 1}, "memory": {"size": -4096}})
    assert any(e.startswith("$.payload") for e in missing)
    assert any(e.startswith("$.cpus.max_vcpus") for e in missing)
    assert any(e.startswith("$.memory.size") for e in missing)
    assert fake_chv.extra_create_checks({"net": [{"mac": "52:54:00:zz:00:01"}]})
    sem = fake_chv.semantic_errors({"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
                                    "memory": {"size": 1000}, "net": [{"num_queues": 4}]})
    assert any("memory.size" in e for e in sem) and any("num_queues" in e for e in sem)


# ---- API statuses and error bodies ----------------------------------------------

def test_api_errors_and_lifecycle_without_boot(env, chv_schema):
    # a stale API socket from a killed run is replaced (v53 behaviour), bare --api-socket form
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(env.dir / "vm.api"))
    stale.close()
    s = env.standin(args=["--api-socket", str(env.dir / "vm.api"), "--log-file", str(env.dir / "vm.log")])
    status, ping = s.get("vmm.ping", keep=True)
    assert status == 200 and ping["version"] == "53.0.0" and ping["pid"] == s.proc.pid
    assert set(ping) == {"build_version", "version", "pid", "features"}

    assert s.get("vm.info", keep=True) == (404, ["Error from API", "The VM info is not available", "VM is not created"])
    assert s.put("vm.boot", keep=True) == (404, ["Error from API", "The VM could not boot", "VM config is missing"])
    assert s.put("vm.reboot", keep=True) == (404, ["Error from API", "The VM could not reboot", "VM is not created"])
    assert s.get("vm.counters", keep=True) == (500, ["Error from API", "The VM info is not available",
                                                     "VM is not running"])
    assert s.put("vm.shutdown", keep=True) == (500, ["Error from API", "The VM could not shutdown", "VM is not running"])
    assert s.put("vm.pause", keep=True)[0] == 500
    assert s.get("vm.nonsense", keep=True) == (404, ["Not Found"])
    assert s.request("GET", "../vmm.ping")[0] == 404
    assert s.get("vm.create", keep=True)[0] == 400          # wrong method
    assert s.put("vmm.ping", keep=True)[0] == 400            # wrong method
    assert s.request("DELETE", "vm.delete")[0] == 400
    status, body = s.put("vm.create", raw=b'{"payload": ', headers={"Content-Type": "application/json"})
    assert status == 400 and body[0] == "Failed to deserialize JSON" and isinstance(body[-1], str)
    assert s.put("vm.create", raw=json.dumps(s.config()).encode())[0] == 400     # no Content-Type
    assert s.put("vm.create", keep=True)[0] == 400                               # no body
    assert s.put("vm.boot", body={}, keep=True) == (400, ["Bad Request", "vm.boot takes no request body"])

    cfg = s.config()
    cfg["cpus"]["boot_vcpu"] = 1
    cfg["net"][0]["mtuu"] = 1500
    status, body = s.put("vm.create", cfg, keep=True)
    assert status == 400 and body[0] == "Failed to deserialize JSON"
    assert any(e.startswith("$.cpus.boot_vcpu:") and "unknown field" in e for e in body), body
    assert any(e.startswith("$.net[0].mtuu:") for e in body), body
    assert all(isinstance(e, str) for e in body)
    assert s.get("vm.info", keep=True)[0] == 404              # nothing stored

    # create: serial file made, config stored
    cfg = s.config(payload={"kernel": str(env.dir / "missing-vmlinux"), "cmdline": "x"})
    assert s.put("vm.create", cfg, keep=True) == (204, None)
    assert s.serial.exists() and s.serial.read_bytes() == b""
    status, info = s.get("vm.info", keep=True)
    assert status == 200 and info["state"] == "Created" and info["config"] == cfg
    assert info["memory_actual_size"] == 256 << 20
    assert s.put("vm.create", cfg, keep=True) == (500, ["Error from API", "The VM could not be created",
                                                        "VM is already created"])
    # boot fails on the missing kernel: 500, still Created
    status, body = s.put("vm.boot", keep=True)
    assert status == 500 and body[:2] == ["Error from API", "The VM could not boot"]
    assert "missing-vmlinux" in " ".join(body) and "os error 2" in body[-1]
    assert s.state() == "Created"
    assert s.put("vm.delete", keep=True) == (204, None)
    assert s.put("vm.delete", keep=True) == (204, None)      # nothing exists: still 204
    assert s.get("vm.info", keep=True)[0] == 404

    # CHV checks done at boot (v53): page-aligned memory
    cfg = s.config(memory={"size": (256 << 20) + 1000})
    assert s.put("vm.create", cfg)[0] == 204
    status, body = s.put("vm.boot")
    assert status == 500 and "page size" in body[-1]
    assert s.put("vm.delete")[0] == 204

    # the serial file cannot be created: 500, but CHV keeps the config (vm.delete first)
    cfg = s.config(serial={"mode": "File", "file": str(env.dir / "no-such-dir" / "serial")})
    status, body = s.put("vm.create", cfg)
    assert status == 500 and body[:2] == ["Error from API", "The VM could not be created"]
    assert s.state() == "Created"
    assert s.put("vm.create", s.config())[0] == 500
    assert s.put("vm.delete")[0] == 204

    assert s.put("vmm.shutdown", keep=True) == (200, None)          # v53: 200, empty body
    assert s.wait_exit(5) == 0
    assert not os.path.exists(s.api_sock)
    log = s.log_file.read_text()
    assert "PUT /api/v1/vm.create -> 400" in log and "GET /api/v1/vmm.ping -> 200" in log


def test_stale_vsock_socket_fails_boot(env, chv_schema):
    s = env.standin()
    cfg = s.config(net=False, cmdline="cbox.vm=novnet")
    assert s.put("vm.create", cfg)[0] == 204
    Path(s.vsock).write_bytes(b"")          # stale leftover: CHV never unlinks before binding
    status, body = s.put("vm.boot")
    assert status == 500 and body[:2] == ["Error from API", "The VM could not boot"]
    assert "Address already in use" in body[-1] and s.vsock in " ".join(body)
    assert s.state() == "Created"
    os.unlink(s.vsock)
    assert s.put("vm.boot")[0] == 204
    assert s.state() == "Running"
    # a guest without net: the vsock proxy still reaches the agent on lo
    deadline = time.monotonic() + 10
    while True:
        with vsock_connect(s.vsock, 4031) as v:
            ok = read_line(v)
            if ok.startswith(b"OK "):
                v.sendall(b"info\n")
                info = json.loads(read_line(v))
                break
        assert time.monotonic() < deadline, "vsock never reached the agent"
        time.sleep(0.05)
    assert info["hostname"] == "novnet"
    assert s.put("vmm.shutdown")[0] == 200
    assert s.wait_exit(5) == 0
    assert not os.path.exists(s.vsock)
    assert wait_gone(lambda: agent_pids(env.dir), 5) == []


def test_disk_image_type_and_serial_as_cloud_hypervisor(env, chv_schema):
    """CHV v51+ autodetects a disk sent without image_type and, when it is raw,
    fails the guest's writes at sector 0 (vmm/src/device_manager.rs
    make_virtio_block_device, virtio-devices/src/block.rs check_request): a
    writable disk without "image_type": "Raw" must fail a test, here the boot."""
    s = env.standin()
    state = env.dir / "state.img"
    state.write_bytes(b"\0" * 4096)
    rootfs = {"path": str(env.dir / "rootfs.img"), "readonly": True, "id": "rootfs"}

    def boot(*disks):
        assert s.put("vm.create", s.config(net=False, cmdline="cbox.vm=disks", disks=list(disks)))[0] == 204
        result = s.put("vm.boot")
        if result[0] != 204:
            assert s.state() == "Created" and s.put("vm.delete")[0] == 204
        return result

    status, body = boot(rootfs, {"path": str(state), "readonly": False, "id": "stateful"})
    assert status == 500 and body[:2] == ["Error from API", "The VM could not boot"], body
    assert "Autodetected raw image type. Disabling sector 0 writes." in body[-1], body
    log = s.log_file.read_text()
    assert "No image_type specified - detected as raw" in log
    status, body = boot(rootfs, {"path": str(state), "readonly": False, "image_type": "Qcow2", "id": "stateful"})
    assert status == 500 and "specified = qcow2, detected = raw" in body[-1], body
    status, body = boot(rootfs, {"path": str(state), "readonly": False, "image_type": "Raw",
                                 "serial": "x" * 21, "id": "stateful"})
    # the body of Cloud Hypervisor v53.0 (seen with the real binary)
    assert (status, body) == (500, ["Error from API", "The VM could not boot", "Failed to validate config",
                                    "Block device serial length (21) exceeds maximum allowed length (20)"])
    # a read-only disk without image_type only warns (its writes fail anyway); a
    # writable one with image_type Raw and a 20-byte serial boots
    assert boot(rootfs, {"path": str(state), "readonly": False, "image_type": "Raw",
                         "serial": "s" * 20, "id": "stateful"}) == (204, None)
    assert s.state() == "Running"
    assert s.put("vmm.shutdown")[0] in (200, 204)
    assert s.wait_exit(5) == 0

    qcow = env.dir / "disk.qcow2"
    qcow.write_bytes(b"QFI\xfb" + b"\0" * 508)
    assert fake_chv.detect_image_type(qcow) == "Qcow2" and fake_chv.detect_image_type(state) == "Raw"
    # the QEMU engine fails the guest's sector-0 writes itself (tests/test_images.py
    # test_promised_state_disk_unusable...[no-image-type]): the stand-in lets it boot
    assert fake_chv.load_engine_class("qemu").models_sector0_writes is True
    assert not getattr(fake_chv.ProcessEngine, "models_sector0_writes", False)


def test_rate_limits_validated_as_cloud_hypervisor(env, chv_schema):
    """CHV v53: an unknown key in a rate_limiter_config is serde's 400 at vm.create
    (RateLimiterConfig is deny_unknown_fields); the group checks of
    VmConfig::validate (vmm/src/config.rs) run at vm.boot: 500 "Failed to validate
    config" with CHV's ValidationError text."""
    s = env.standin()
    state = env.dir / "state.img"
    state.write_bytes(b"\0" * 4096)
    bucket = {"size": 1 << 20, "refill_time": 1000}

    def config(groups, **stateful):
        disks = [{"path": str(env.dir / "rootfs.img"), "readonly": True, "image_type": "Raw", "id": "rootfs",
                  "rate_limit_group": "disks"},
                 {"path": str(state), "readonly": False, "image_type": "Raw", "id": "stateful", **stateful}]
        cfg = s.config(net=False, cmdline="cbox.vm=limits", disks=disks)
        if groups is not None:
            cfg["rate_limit_groups"] = groups
        return cfg

    def boot(cfg):
        assert s.put("vm.create", cfg) == (204, None)
        result = s.put("vm.boot")
        if result[0] != 204:
            assert s.state() == "Created"
        assert s.put("vm.delete")[0] == 204
        return result

    def refused(why):
        return 500, ["Error from API", "The VM could not boot", "Failed to validate config", why]

    group = {"id": "disks", "rate_limiter_config": {"bandwidth": bucket, "ops": {"size": 100, "refill_time": 1000}}}
    for limiter in ({"bandwidth": dict(bucket, one_time_burst=4096)}, {"ops": {"size": 0, "refill_time": 0}},
                    {"bandwidth": {"size": 0, "refill_time": 1000}, "ops": bucket}):
        status, body = s.put("vm.create", config([{"id": "disks", "rate_limiter_config": limiter}],
                                                 rate_limit_group="disks"))
        assert status == 204, body
        assert s.get("vm.info")[1]["config"]["rate_limit_groups"][0]["rate_limiter_config"] == limiter
        assert s.put("vm.delete")[0] == 204
    # a limited rootfs in a group, the stateful disk with its own limiter: boots
    assert boot(config([group], rate_limiter_config={"bandwidth": bucket})) == (204, None)

    for where, cfg in (("$.rate_limit_groups[0].rate_limiter_config.iops",
                        config([{"id": "disks", "rate_limiter_config": {"bandwidth": bucket, "iops": bucket}}])),
                       ("$.disks[1].rate_limiter_config.bw",
                        config([group], rate_limiter_config={"bw": bucket}))):
        status, body = s.put("vm.create", cfg)
        assert status == 400 and body[0] == "Failed to deserialize JSON", body
        assert any(e.startswith(f"{where}: unknown field `{where.rsplit('.', 1)[1]}`, "
                                "expected `bandwidth` or `ops`") for e in body), body
        assert s.get("vm.info")[0] == 404                      # nothing stored
    status, body = s.put("vm.create", config([{"id": "disks", "rate_limiter_config": {"ops": {"size": 5}}}]))
    assert status == 400 and any(e.startswith("$.rate_limit_groups[0].rate_limiter_config.ops.refill_time: "
                                              "missing required") for e in body), body

    assert boot(config([{"id": "disks", "rate_limiter_config": {}}])) == refused("Invalid rate-limiter group")
    assert boot(config([dict(group, id=""), group])) == refused("Invalid rate-limiter group")
    assert boot(config(None)) == refused("Invalid rate-limiter group")                    # no groups at all
    assert boot(config([dict(group, id="other")])) == refused("Invalid rate-limiter group")  # unknown group
    assert boot(config([group], rate_limit_group="disks",
                       rate_limiter_config={"bandwidth": bucket})) == refused("Invalid rate-limiter group")
    assert boot(config([group, dict(group, id="__cbox")])) == refused("Identifier __cbox is not invalid")
    assert boot(config([group, dict(group, id="stateful")])) == refused("Identifier stateful is not unique")
    assert boot(config([group, group])) == refused("Identifier disks is not unique")
    cfg = config([group], vhost_user=True, rate_limiter_config={"bandwidth": bucket})
    del cfg["disks"][1]["path"]
    cfg["disks"][1]["vhost_socket"] = str(env.dir / "vhost.sock")
    assert boot(cfg)[1][3:] == ["Rate limiting is not supported with vhost-user"]
    assert s.put("vmm.shutdown")[0] == 200
    assert s.wait_exit(5) == 0


# ---- booting: network, namespaces, lifecycle -------------------------------------

@pytest.mark.parametrize("relay", ["kernel", "python"])
def test_boot_network_lifecycle(env, chv_schema, relay):
    env.bridge()
    s = env.standin(name="guest1", extra_env={"CBOX_STANDIN_RELAY": relay})
    host_name = socket.gethostname()
    cfg = s.config()
    assert s.put("vm.create", cfg) == (204, None)
    assert s.put("vm.boot") == (204, None)
    assert s.state() == "Running"

    info = guest_info(env.ns, s)
    assert info["hostname"] == "guest1"                       # its own UTS namespace...
    assert socket.gethostname() == host_name                  # ...not the host's
    assert info["env"]["CBOX_CALLBACK_SOCKET"] == s.vsock + "_4032"
    assert info["env"]["CBOX_CMDLINE"] == cfg["payload"]["cmdline"]
    assert MAC in info["link"]
    assert env.ns.pids() == [s.proc.pid]                      # the guest is in a netns of its own
    serial = s.serial.read_text()
    assert "cbox-standin" in serial and cfg["payload"]["cmdline"] in serial and "test-agent: ready" in serial
    # which relay moves the frames: the kernel's never passes them through the tap's fd
    label = {"kernel": "kernel relay: veth cbveth", "python": "Python relay: tap eth0"}[relay]
    assert f"cbox-standin: net: eth0 <-> {TAP} ({label}" in serial, serial
    assert "unavailable" not in serial
    seen = tap_fd_packets(env.ns)
    assert echo(env.ns, 1 << 20)
    through_fd = tap_fd_packets(env.ns) - seen
    assert through_fd == 0 if relay == "kernel" else through_fd > 700, through_fd     # 1 MiB each way
    assert len(host_veths(env.ns)) == (relay == "kernel") and tap_clsact(env.ns) == (relay == "kernel")

    # hybrid vsock: CONNECT to the agent's port is proxied, another port reads EOF
    with vsock_connect(s.vsock, 4031) as v:
        assert read_line(v).startswith(b"OK ")
        v.sendall(b"info\n")
        assert json.loads(read_line(v))["hostname"] == "guest1"
    with vsock_connect(s.vsock, 4999) as v:
        assert v.recv(100) == b""

    assert s.put("vm.boot") == (500, ["Error from API", "The VM could not boot", "VM is already created"])
    assert s.put("vm.resume")[0] == 500

    # pause / resume stop and continue the guest's processes
    [agent] = agent_pids(env.dir)
    assert s.put("vm.pause") == (204, None)
    assert s.state() == "Paused" and proc_state(agent) == "T"
    with pytest.raises(OSError):            # no frame reaches a paused guest, not even its kernel
        env.ns.connect((GUEST_IP, 4031), timeout=0.5).close()
    assert s.put("vm.resume") == (204, None)
    assert s.state() == "Running" and proc_state(agent) != "T"
    assert guest_info(env.ns)["hostname"] == "guest1"

    # a second VMM on the same tap: busy tap -> 500 at boot
    s2 = env.standin(name="other")
    assert s2.put("vm.create", s2.config())[0] == 204
    status, body = s2.put("vm.boot")
    assert status == 500 and body[:2] == ["Error from API", "The VM could not boot"]
    assert "busy" in body[-1] and "os error 16" in body[-1]
    assert not os.path.exists(s2.vsock)
    assert s2.put("vmm.shutdown")[0] == 200 and s2.wait_exit(5) == 0

    # shutdown keeps the config; the guest and its vsock socket are gone
    assert s.put("vm.shutdown") == (204, None)
    assert s.state() == "Created"
    assert agent_pids(env.dir) == [] and not os.path.exists(s.vsock)
    assert host_veths(env.ns) == [] and not tap_clsact(env.ns)      # undone before the reply
    assert s.put("vm.shutdown")[0] == 500
    assert s.put("vm.boot") == (204, None)                    # boot again works
    info2 = guest_info(env.ns, s)
    assert info2["hostname"] == "guest1"
    assert agent_pids(env.dir) != [agent]
    assert "test-agent: ready" in s.serial.read_text() and label in s.serial.read_text()
    assert echo(env.ns, 1 << 16)

    # the guest powers off by itself: the VMM process exits 0
    with env.ns.connect((GUEST_IP, 4031), timeout=5) as c:
        c.sendall(b"exit 0\n")
        assert c.recv(10) == b"bye\n"
    assert s.wait_exit(5) == 0
    assert not os.path.exists(s.api_sock) and not os.path.exists(s.vsock)
    assert wait_gone(lambda: agent_pids(env.dir), 5) == []
    assert "Power down" in s.serial.read_text()
    assert host_veths(env.ns) == [] and not tap_clsact(env.ns)
    log = s.log_file.read_text()
    assert "PUT /api/v1/vm.boot -> 204" in log and "powered off" in log
    assert f"net relay {relay}" in log


def test_rate_limiter_as_cloud_hypervisor():
    """rate_limiter/src/lib.rs semantics, on a clock the test sets: a bucket starts
    full, refills size per refill_time, one_time_burst is spent first; a frame
    goes through and then takes one op and its bytes (net_util queue_pair.rs);
    when a bucket cannot pay, nothing is taken and the limiter refuses everything
    for 100 ms; a frame larger than the bucket empties it and blocks ratio *
    refill_time."""
    limiter = fake_chv.RateLimiter({"bandwidth": {"size": 3000, "refill_time": 1000},
                                    "ops": {"size": 3, "refill_time": 500}}, now=10.0)
    assert [limiter.take_frame(1000, 10.0) for _ in range(4)] == [True, True, True, False]   # ops: 3
    assert limiter.unblocked_at() == pytest.approx(10.1)
    assert not limiter.take_frame(1, 10.05)                   # blocked: even a frame that would fit
    assert limiter.take_frame(500, 10.2)                      # 10.2: 1.2 ops and 600 bytes refilled
    assert not limiter.take_frame(500, 10.2)                  # 0.2 ops: refused before the bytes are asked
    assert limiter.unblocked_at() == pytest.approx(10.3)
    assert not limiter.take_frame(1000, 10.45)                # an op; 100 + 750 bytes: too few, none taken
    assert limiter.take_frame(1000, 10.6)                     # 850 + 450 bytes
    big = fake_chv.RateLimiter({"bandwidth": {"size": 1000, "refill_time": 1000, "one_time_burst": 500}}, now=0.0)
    assert big.take_frame(400, 0.0) and big.take_frame(3100, 0.0)   # burst 100 left, then 3000 > size 1000:
    assert big.unblocked_at() == pytest.approx(2.0)                  # 2000 over the budget -> 2 s blocked
    off = fake_chv.RateLimiter({"bandwidth": {"size": 0, "refill_time": 1000}, "ops": {"size": 5, "refill_time": 0}},
                               now=0.0)
    assert all(off.take_frame(1 << 20, 0.0) for _ in range(100))
    assert fake_chv.net_rate_limiters({"rate_limiter_config": {"bandwidth": {"size": 0, "refill_time": 1}}}) is None
    rx, tx = fake_chv.net_rate_limiters({"rate_limiter_config": {"ops": {"size": 1, "refill_time": 1000}}})
    assert rx is not tx                                       # one limiter per direction


def test_the_kernel_relay_says_it_does_not_enforce_a_net_rate_limit(env, chv_schema):
    """A deviation, said on the console: the default (kernel) relay moves frames with tc
    mirred, which does not limit; the VM still works."""
    env.bridge()
    s = env.standin(name="unlimited")
    cfg = s.config()
    cfg["net"][0]["rate_limiter_config"] = {"bandwidth": {"size": 1 << 20, "refill_time": 1000}}
    assert s.put("vm.create", cfg) == (204, None)
    assert s.put("vm.boot") == (204, None)
    guest_info(env.ns, s)
    serial = s.serial.read_text()
    assert "(kernel relay: veth" in serial and "rate_limiter_config NOT enforced" in serial, serial
    assert "relaying frames in Python" not in serial, serial


def test_net_rate_limit_holds_a_guest_stream_near_the_limit(env, chv_schema):
    """net[0].rate_limiter_config as CHV applies it: the guest's frames (tx) and
    the frames to it (rx) each through their own token bucket, frames waiting
    while it is empty, in the Python relay.  Generous bounds: a busy host only
    slows the stream."""
    env.bridge()
    s = env.standin(name="limited", extra_env={"CBOX_STANDIN_RELAY": "python"})
    limit = 1 << 20
    cfg = s.config()
    cfg["net"][0]["rate_limiter_config"] = {"bandwidth": {"size": limit, "refill_time": 1000}}
    assert s.put("vm.create", cfg) == (204, None)
    assert s.put("vm.boot") == (204, None)
    guest_info(env.ns, s)
    serial = s.serial.read_text()
    assert "Python relay: tap eth0, read/write in the guest VMM, rx and tx each rate-limited)" in serial, serial
    size = 4 * limit
    with env.ns.connect((GUEST_IP, 4031), timeout=30) as c:
        c.sendall(f"send {size}\n".encode())
        got, t0 = 0, time.monotonic()
        while got < size:
            chunk = c.recv(1 << 20)
            assert chunk, got
            got += len(chunk)
        took = time.monotonic() - t0
    rate = size / took
    print(f"\nguest -> host: {size >> 20} MiB in {took:.2f}s = {rate / limit:.2f} x the limit")
    # the bucket starts full: one second's worth goes at once, the rest at the limit (3 s)
    assert took >= 2.4, took
    assert rate >= limit / 8, took
    assert echo(env.ns, 64 << 10)                             # both ways still work
    assert s.put("vmm.shutdown")[0] == 200
    assert s.wait_exit(10) == 0


def boot_guest(env, standin):
    """vm.create + vm.boot, then wait until the guest's agent answers over the bridge + tap."""
    assert standin.put("vm.create", standin.config())[0] == 204
    assert standin.put("vm.boot")[0] == 204
    return guest_info(env.ns, standin)


def test_kill9_leaks_nothing(env, chv_schema):
    env.bridge()
    s = env.standin()
    boot_guest(env, s)
    assert len(agent_pids(env.dir)) == 1
    children = [int(p) for p in Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split()]
    assert children
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait(5)
    assert wait_gone(lambda: agent_pids(env.dir), 5) == []
    assert wait_gone(lambda: [p for p in children if running(p)], 5) == []
    assert env.ns.pids() == []
    # the host veth dies with the guest's netns; the tap keeps its clsact until a new
    # VMM replaces it (cbox deletes the tap anyway)
    assert wait_gone(lambda: host_veths(env.ns), 5) == []
    # like CHV after SIGKILL the socket files stay; the tap is free again for a new VMM
    assert os.path.exists(s.api_sock) and os.path.exists(s.vsock)
    os.unlink(s.vsock)
    s2 = env.standin()                       # same API socket path: stale file replaced
    assert s2.put("vm.create", s2.config())[0] == 204
    assert s2.put("vm.boot")[0] == 204
    assert guest_info(env.ns, s2)["hostname"] == "vm"
    assert "(kernel relay" in s2.serial.read_text() and echo(env.ns, 1 << 16)
    assert len(host_veths(env.ns)) == 1


def test_kernel_relay_plumbing(env, chv_schema):
    """veth + tc mirred: the host end is up, unaddressed, unbridged; MTU and MAC
    follow net[0]; vm.delete undoes it; a new boot on the same tap works."""
    env.bridge()
    env.ns.run("ip", "link", "set", "br0", "mtu", "1400")
    env.ns.run("ip", "link", "set", TAP, "mtu", "1400")
    s = env.standin()
    cfg = s.config()
    cfg["net"][0]["mtu"] = 1400
    assert s.put("vm.create", cfg)[0] == 204
    assert s.put("vm.boot")[0] == 204
    info = guest_info(env.ns, s)
    assert MAC in info["link"] and "mtu 1400" in info["link"]
    [veth] = host_veths(env.ns)
    assert f"host veth {veth}" in s.log_file.read_text()
    link = env.ns.run("ip", "-o", "link", "show", veth).stdout
    assert "mtu 1400" in link and ",UP" in link and "master" not in link
    assert env.ns.run("ip", "-o", "addr", "show", "dev", veth).stdout == ""     # no IPv4, no IPv6
    assert echo(env.ns, 4 << 20)
    egress = env.ns.run("tc", "-s", "filter", "show", "dev", TAP, "egress").stdout
    ingress = env.ns.run("tc", "-s", "filter", "show", "dev", veth, "ingress").stdout
    assert f"Egress Redirect to device {veth}" in egress, egress
    assert f"Ingress Redirect to device {TAP}" in ingress, ingress
    sent = [int(n) for n in re.findall(r"Sent \d+ bytes (\d+) pkt", egress + ingress)]
    assert len(sent) == 2 and min(sent) > 1000, (egress, ingress)
    assert s.put("vm.delete") == (204, None)
    assert host_veths(env.ns) == [] and not tap_clsact(env.ns)
    # a clsact left on the tap by a VMM killed with SIGKILL: replaced, not an error
    env.ns.run("ip", "link", "add", "stale0", "type", "bridge")    # (no dummy module here)
    env.ns.run("tc", "qdisc", "add", "dev", TAP, "clsact")
    env.ns.run("tc", "filter", "add", "dev", TAP, "egress", "protocol", "all", "u32", "match", "u32", "0", "0",
               "action", "mirred", "egress", "redirect", "dev", "stale0")
    assert s.put("vm.create", cfg)[0] == 204
    assert s.put("vm.boot")[0] == 204
    assert guest_info(env.ns, s)["hostname"] == "vm" and echo(env.ns, 1 << 16)
    assert "stale0" not in env.ns.run("tc", "filter", "show", "dev", TAP, "egress").stdout
    assert s.put("vmm.shutdown")[0] == 200 and s.wait_exit(5) == 0
    assert host_veths(env.ns) == [] and not tap_clsact(env.ns)


def test_veth_deleted_before_the_reply_even_if_the_guest_netns_lingers(env, chv_schema):
    """The guest's veth pair is deleted, not left to its netns going away: a netns can
    outlive its processes (here: held open by this test), the pair must not."""
    env.bridge()
    s = env.standin()
    boot_guest(env, s)
    [agent] = agent_pids(env.dir)
    held = os.open(f"/proc/{agent}/ns/net", os.O_RDONLY)
    try:
        assert len(host_veths(env.ns)) == 1
        assert s.put("vm.shutdown") == (204, None)
        assert host_veths(env.ns) == [] and not tap_clsact(env.ns)
    finally:
        os.close(held)


def test_guest_vmm_killed_relay_undone_by_standin(env, chv_schema):
    env.bridge()
    s = env.standin()
    boot_guest(env, s)
    [vmm] = [int(p) for p in Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split()]
    assert len(host_veths(env.ns)) == 1 and tap_clsact(env.ns)
    os.kill(vmm, signal.SIGKILL)             # nothing of the guest VMM's own cleanup runs
    assert s.wait_exit(5) == 0               # guest gone: the VMM exits, as after a power-off
    assert host_veths(env.ns) == [] and not tap_clsact(env.ns)
    assert "guest VMM killed by signal 9" in s.log_file.read_text()
    assert wait_gone(lambda: agent_pids(env.dir), 5) == []


def test_kernel_relay_failure_falls_back(env, chv_schema):
    """A kernel relay the kernel refuses: the guest VMM undoes what it did, says why
    on the console and in the log, and relays the frames in Python."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is not installed")
    env.bridge()
    # In a pid namespace of its own the stand-in is pid 1 and its guest VMM pid 2, so
    # the host veth will be cbveth2: a link of that name makes its creation fail.
    env.ns.run("ip", "link", "add", fake_chv.host_veth_name(2), "type", "bridge")   # (no dummy module here)
    s = env.standin(wrapper=["unshare", "--pid", "--kill-child"])
    assert boot_guest(env, s)["hostname"] == "vm" and echo(env.ns, 1 << 16)
    note = "net: kernel relay unavailable (create veth cbveth2 <-> eth0: File exists), relaying frames in Python"
    serial = s.serial.read_text()
    assert f"cbox-standin: {note}\n" in serial and "(Python relay: tap eth0" in serial, serial
    log = s.log_file.read_text()
    assert note in log and "net relay python" in log
    assert not tap_clsact(env.ns) and env.ns.run("ip", "-o", "link", "show", "type", "veth").stdout == ""
    assert "cbveth2" in env.ns.run("ip", "-o", "link", "show", "type", "bridge").stdout   # not ours: kept
    assert s.put("vmm.shutdown")[0] == 200 and s.wait_exit(5) == 0
    # no tap, or the python mode: the netns is unshared, nothing else
    r = env.ns.run(sys.executable, "-c", "import fake_chv; print(fake_chv._unshare_net({}, 'kernel'))",
                   env=dict(os.environ, PYTHONPATH=str(STANDIN.parent)))
    assert r.stdout.strip() == "(None, None)"
    # the stand-in logs the guest VMM's note and takes its final line
    logged = []
    engine = fake_chv.ProcessEngine({}, logged.append)
    rd, wr = os.pipe()
    os.write(wr, b"LOG net: kernel relay unavailable (x), relaying frames in Python\nOK 7 python\n")
    os.close(wr)
    assert engine._read_report(rd) == "OK 7 python"
    os.close(rd)
    assert logged == ["net: kernel relay unavailable (x), relaying frames in Python"]


def test_sigterm_stops_vm(env, chv_schema):
    s = env.standin()
    assert s.put("vm.create", s.config(net=False))[0] == 204
    assert s.put("vm.boot")[0] == 204
    wait_for(lambda: agent_pids(env.dir), 5, what="the guest agent process")
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait_exit(5) == 0
    assert agent_pids(env.dir) == []
    assert not os.path.exists(s.api_sock) and not os.path.exists(s.vsock)


def test_without_schema_validation_is_skipped_loudly(env):
    s = env.standin(extra_env={"CBOX_CHV_SCHEMA": str(env.dir / "absent.json")})
    assert "DISABLED" in s.log_file.read_text() and "DISABLED" in s.out_file.read_text()
    cfg = s.config()
    cfg["not_a_field"] = 1
    assert s.put("vm.create", cfg)[0] == 204
    assert s.put("vmm.shutdown")[0] == 200 and s.wait_exit(5) == 0


def test_with_the_real_guest_agent(env, chv_schema):
    agent = REPO / "guest_agent.py"
    env.bridge()
    s = env.standin(extra_env={"CBOX_GUEST_AGENT": str(agent)})
    cmdline = (f"console=ttyS0 cbox.vm=real1 cbox.ip={GUEST_IP}/24 cbox.gw=10.77.0.1 "
               "cbox.dns=10.77.0.1 cbox.callback_port=4032")
    assert s.put("vm.create", s.config(cmdline=cmdline))[0] == 204
    assert s.put("vm.boot")[0] == 204
    deadline = time.monotonic() + 15
    while True:                 # the vsock proxy answers at once (EOF) until the agent listens
        with vsock_connect(s.vsock, 4031) as v:
            if read_line(v).startswith(b"OK "):
                break
        assert time.monotonic() < deadline, s.serial.read_text()
        time.sleep(0.02)
    while True:
        try:
            sock = env.ns.connect((GUEST_IP, 4031), timeout=2)
            conn = http.client.HTTPConnection(GUEST_IP, 4031, timeout=5)
            conn.sock = sock
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            conn.close()
            break
        except OSError:
            assert time.monotonic() < deadline, s.serial.read_text()
            time.sleep(0.1)
    assert resp.status == 200
    with vsock_connect(s.vsock, 4031) as v:
        assert read_line(v).startswith(b"OK ")
        v.sendall(b"GET /health HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n")
        reply = b""
        while True:
            chunk = v.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]
    assert s.put("vmm.shutdown")[0] == 200 and s.wait_exit(10) == 0


# ---- serial Socket mode --------------------------------------------------------

def read_until(sock, needle, timeout=10.0):
    """Bytes from sock up to and including `needle` (fails on EOF or timeout)."""
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no {needle!r} within {timeout}s: {data[-1500:]!r}") from None
        assert chunk, f"EOF before {needle!r}: {data[-500:]!r}"
        data += chunk
    return data


def serial_client(path):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(path)
    return c


def test_serial_buffer_ring_and_slow_client():
    """serial_buffer/src/lib.rs: 1 MiB ring, newest kept, replayed on attach; a
    client that cannot take more gets the rest re-buffered, never a stall."""
    buf = fake_chv.SerialBuffer()
    buf.write(b"a" * (fake_chv.SERIAL_BUFFER_MAX - 10))
    buf.write(b"0123456789ABCDEF")
    assert len(buf.ring) == fake_chv.SERIAL_BUFFER_MAX and buf.ring.endswith(b"0123456789ABCDEF")
    buf.write(b"x" * (fake_chv.SERIAL_BUFFER_MAX + 5) + b"END")
    assert bytes(buf.ring) == b"x" * (fake_chv.SERIAL_BUFFER_MAX - 3) + b"END"
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.setblocking(False)
        started = time.monotonic()
        buf.attach(a)                      # replay: only what the socket takes now
        buf.write(b"more")
        assert time.monotonic() - started < 5
        assert 0 < len(buf.ring) <= fake_chv.SERIAL_BUFFER_MAX and buf.ring.endswith(b"ENDmore")
        got = b""
        while not got.endswith(b"ENDmore"):
            b.settimeout(2)
            got += b.recv(1 << 20)
            buf.write(b"")                 # CHV flushes the ring on the guest's next write
        assert got.endswith(b"x" * 100 + b"ENDmore") and buf.ring == b""
        buf.detach()
        buf.write(b"while away")
        assert buf.ring == b"while away"


def test_serial_socket_mode(env, chv_schema):
    """vm.create binds serial.socket; output is buffered until a client comes and
    replayed to it; a new client replaces the old one; client bytes are serial
    input; shutdown removes the socket file and the next boot binds it again."""
    s = env.standin()
    sock_path = str(env.dir / "vm.serial.sock")
    cfg = s.config(net=False, cmdline="cbox.vm=serial", serial={"mode": "Socket", "socket": sock_path})
    assert s.put("vm.create", cfg) == (204, None)
    assert stat_is_socket(sock_path)
    assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o700      # CHV's umask 077
    assert stat.S_IMODE(os.lstat(s.log_file).st_mode) == 0o600
    assert s.put("vm.boot") == (204, None)
    deadline = time.monotonic() + 10
    while not agent_pids(env.dir):
        assert time.monotonic() < deadline, s.output()
        time.sleep(0.02)
    [agent] = agent_pids(env.dir)                    # the guest wrote while nobody listens:
    wait_for(lambda: wchan(agent) == "inet_csk_accept", what=s.output())   # its ready line is out
    assert stat_is_socket(sock_path), s.output()
    first = serial_client(sock_path)
    replay = read_until(first, b"test-agent: ready\n")
    assert replay.startswith(b"cbox-standin: Cloud Hypervisor"), replay[:200]
    first.sendall(b"hello serial\n")
    assert b"test-agent: input: hello serial" in read_until(first, b"hello serial\n")
    second = serial_client(sock_path)                # replaces the first: shut down
    first.settimeout(5)
    while first.recv(65536):
        pass
    first.close()
    second.sendall(b"from second\n")
    got = read_until(second, b"from second\n")
    assert b"test-agent: ready" not in got           # drained bytes are not resent
    second.close()
    assert s.put("vm.shutdown") == (204, None)
    assert not os.path.exists(sock_path)             # SerialManager dropped: file removed
    assert s.put("vm.boot") == (204, None)           # re-bound by the boot
    third = serial_client(sock_path)
    assert b"test-agent: ready" in read_until(third, b"test-agent: ready\n")
    third.close()
    assert s.put("vm.delete") == (204, None)
    assert not os.path.exists(sock_path)
    # create + delete without a boot: CHV keeps the listener bound and the file stays,
    # so the next vm.create fails (EADDRINUSE) and keeps its config
    assert s.put("vm.create", cfg) == (204, None)
    assert s.put("vm.delete") == (204, None)
    assert stat_is_socket(sock_path)
    assert s.put("vm.create", cfg) == (500, ["Error from API", "The VM could not be created",
                                             "Error creating console devices", "Error creating console device",
                                             "Address already in use (os error 98)"])
    assert s.state() == "Created"
    assert s.put("vmm.shutdown")[0] == 200 and s.wait_exit(5) == 0
    assert stat_is_socket(sock_path)                 # never booted: left behind, as by CHV


def stat_is_socket(path):
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


# ---- event monitor -------------------------------------------------------------

def read_events(fd, want_last=("vmm", "shutdown"), timeout=10.0, data=b""):
    """Events from a non-blocking fd until `want_last` (pretty JSON, each + "\\n\\n"),
    after those in `data` (bytes read from it before)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            chunk = None
        if chunk:
            data += chunk
        events = [json.loads(part) for part in data.decode().split("\n\n") if part.strip()]
        if events and (events[-1]["source"], events[-1]["event"]) == want_last and data.endswith(b"\n\n"):
            return data, events
        assert time.monotonic() < deadline, data.decode()
        time.sleep(0.02)


def names(events):
    return [f"{e['source']} {e['event']}" for e in events]


def test_event_monitor_fifo_lifecycle(env, chv_schema):
    """--event-monitor path=FIFO: the open waits for a reader (before the API socket
    exists); each event is pretty JSON + a blank line, in CHV's order."""
    fifo = env.dir / "events"
    os.mkfifo(fifo)
    s = env.standin(args=["--api-socket", f"path={env.dir / 'vm.api'}", "--event-monitor", f"path={fifo}",
                          "--log-file", str(env.dir / "vm.log"), "-v"], wait=False)
    wait_for(lambda: wchan(s.proc.pid) == "wait_for_partner", what="the open() of the FIFO to block")
    assert s.proc.poll() is None and not os.path.exists(s.api_sock)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        s.wait_api()
        cfg = s.config(net=False, cmdline="cbox.vm=events")
        assert s.put("vm.boot")[0] == 404                  # "booting", then no config
        assert s.put("vm.create", cfg)[0] == 204
        assert s.put("vm.boot") == (204, None)
        assert s.put("vm.boot")[0] == 500                  # already booted: no event
        assert s.put("vm.pause")[0] == 204 and s.put("vm.pause")[0] == 500
        assert s.put("vm.resume")[0] == 204
        assert s.put("vm.shutdown") == (204, None)
        assert s.put("vm.boot") == (204, None)
        assert s.put("vm.reboot") == (204, None)
        assert s.state() == "Running"
        assert s.put("vm.delete") == (204, None)
        assert s.put("vm.delete") == (204, None)           # nothing: no event
        assert s.put("vmm.shutdown")[0] == 200
        assert s.wait_exit(5) == 0
        data, events = read_events(rfd)
    finally:
        os.close(rfd)
    assert names(events) == [
        "vmm starting", "vm booting", "vm booting", "vm booted", "vm pausing", "vm paused", "vm pausing",
        "vm resuming", "vm resumed", "vm shutdown", "vm booting", "vm booted", "vm rebooting", "vm rebooted",
        "vm shutdown", "vm deleted", "vmm shutdown"]
    # serde_json::to_string_pretty of {timestamp: Duration, source, event, properties}
    first = data.decode().split("\n\n")[0]
    assert re.fullmatch(r'\{\n  "timestamp": \{\n    "secs": 0,\n    "nanos": \d+\n  \},\n  "source": "vmm",\n'
                        r'  "event": "starting",\n  "properties": null\n\}', first), first
    stamps = [e["timestamp"]["secs"] * 10**9 + e["timestamp"]["nanos"] for e in events]
    assert stamps == sorted(stamps) and all(0 <= e["timestamp"]["nanos"] < 10**9 for e in events)
    log = s.log_file.read_text()
    assert "Event: source = vm event = rebooted" in log and "Cloud Hypervisor exited successfully" in log


def events_standin(env, name="vm", **kw):
    """A stand-in with --event-monitor on a pipe; returns (standin, read fd)."""
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    s = env.standin(name=name, args=["--api-socket", f"path={env.dir / (name + '.api')}",
                                     "--event-monitor", f"fd={wfd}",
                                     "--log-file", str(env.dir / (name + ".log")), "-v"], pass_fds=(wfd,), **kw)
    os.close(wfd)
    return s, rfd


def test_event_monitor_guest_poweroff_and_fd(env, chv_schema):
    """--event-monitor fd=N; a guest power-off goes through CHV's GuestExit path:
    vm shutdown, vm deleted, vmm shutdown, and exit code 0; a reader that went
    away (EPIPE) changes nothing."""
    s, rfd = events_standin(env)
    try:
        assert s.put("vm.create", s.config(net=False, cmdline="cbox.vm=off"))[0] == 204
        assert s.put("vm.boot")[0] == 204
        deadline = time.monotonic() + 10
        while True:
            with vsock_connect(s.vsock, 4031) as v:
                if read_line(v).startswith(b"OK "):
                    v.sendall(b"exit 0\n")
                    assert read_line(v) == b"bye\n"
                    break
            assert time.monotonic() < deadline, s.output()
            time.sleep(0.05)
        assert s.wait_exit(5) == 0
        _, events = read_events(rfd)
    finally:
        os.close(rfd)
    assert names(events) == ["vmm starting", "vm booting", "vm booted", "vm shutdown", "vm deleted",
                             "vmm shutdown"]
    log = s.log_file.read_text()
    assert "VM guest exit event" in log and "VM exit event" not in log
    # no reader at all: events are lost, nothing else changes (CHV ignores write errors)
    rfd, wfd = os.pipe()
    os.close(rfd)
    s2 = env.standin(name="noreader", args=["--api-socket", f"path={env.dir / 'noreader.api'}",
                                            "--event-monitor", f"fd={wfd}"], pass_fds=(wfd,))
    os.close(wfd)
    assert s2.put("vm.create", s2.config(net=False, cmdline="cbox.vm=nr"))[0] == 204
    assert s2.put("vmm.shutdown")[0] == 200 and s2.wait_exit(5) == 0
    # a regular file is truncated at start
    new_path = env.dir / "new-events.json"
    s4 = env.standin(name="new", args=["--api-socket", f"path={env.dir / 'new.api'}",
                                       "--event-monitor", f"path={new_path}"])
    assert s4.put("vmm.shutdown")[0] == 200 and s4.wait_exit(5) == 0
    assert stat.S_IMODE(new_path.stat().st_mode) == 0o600          # CHV's umask 077
    path = env.dir / "events.json"
    path.write_text("stale\n" * 1000)
    s3 = env.standin(name="file", args=["--api-socket", f"path={env.dir / 'file.api'}",
                                        "--event-monitor", f"path={path}"])
    assert s3.put("vmm.shutdown")[0] == 200 and s3.wait_exit(5) == 0
    assert path.read_text().startswith("{") and "stale" not in path.read_text()
    r = subprocess.run([sys.executable, str(STANDIN), "--api-socket", "path=/nonexistent/x",
                        "--event-monitor", "bogus"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "--event-monitor" in r.stderr


# ---- guest reset: reboot inside the process ----------------------------------------

def vsock_command(s, command, timeout=10.0):
    """Send one line to the test agent over the hybrid vsock (retrying until it listens)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with vsock_connect(s.vsock, 4031) as v:
                if read_line(v).startswith(b"OK "):
                    v.sendall(command.encode() + b"\n")
                    return read_line(v)
        except (FileNotFoundError, ConnectionRefusedError):
            pass                                        # between two boots of a reboot
        assert time.monotonic() < deadline, s.output()
        time.sleep(0.05)


def test_guest_reset_reboots_inside_the_process(env, chv_schema):
    """reboot(2) RESTART in the guest: same VMM process, vm rebooting/rebooted,
    the File-mode serial truncated, the vsock socket re-created, the guest boots
    again; reboot(2) POWER_OFF ends the process (exit 0) as a power-off."""
    s, fifo_r = events_standin(env)
    try:
        assert s.put("vm.create", s.config(net=False, cmdline="cbox.vm=rst"))[0] == 204
        assert s.put("vm.boot")[0] == 204
        assert vsock_command(s, "info").startswith(b"{")
        [agent] = agent_pids(env.dir)
        assert vsock_command(s, "reboot") == b"bye\n", s.serial.read_text()
        wait_for(lambda: "VM reset event" in s.log_file.read_text() and agent_pids(env.dir) not in ([], [agent]),
                 what=s.output())
        assert s.proc.poll() is None and s.state() == "Running"
        assert json.loads(vsock_command(s, "info"))["hostname"] == "rst"   # booted again
        assert f"vsock socket bound at {s.vsock}" in s.log_file.read_text().split("VM reset event")[1]
        serial = s.serial.read_text()
        assert "test-agent: reboot" not in serial and "Restarting system" not in serial   # truncated
        assert serial.startswith("cbox-standin: Cloud Hypervisor")
        assert s.put("vm.reboot") == (204, None)                             # the API does the same
        assert json.loads(vsock_command(s, "info"))["hostname"] == "rst"
        assert vsock_command(s, "poweroff") == b"bye\n"
        assert s.wait_exit(10) == 0
        _, events = read_events(fifo_r)
    finally:
        os.close(fifo_r)
    assert names(events) == ["vmm starting", "vm booting", "vm booted", "vm rebooting", "vm rebooted",
                             "vm rebooting", "vm rebooted", "vm shutdown", "vm deleted", "vmm shutdown"]
    assert "Power down" in s.serial.read_text()
    log = s.log_file.read_text()
    assert "VM guest exit event" in log and "VM exit event" not in log
    assert not os.path.exists(s.vsock) and wait_gone(lambda: agent_pids(env.dir), 5) == []


QEMU_KERNEL = REPO / "out" / "vmlinuz"


def need_qemu_kernel():
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed")
    if not QEMU_KERNEL.exists():
        pytest.skip(f"{QEMU_KERNEL} missing (make images)")


def test_qemu_engine_guest_reset_and_serial_socket(env, chv_schema):
    """QEMU engine: a real kernel that panics (no root fs) with panic=-1 resets;
    QEMU (-no-reboot) exits with SHUTDOWN reason guest-reset and the stand-in
    rebuilds the VM in its process (vm rebooting, vm rebooted); the Socket-mode
    serial carries the kernel's console and is bound again by the reboot."""
    need_qemu_kernel()
    s, rfd = events_standin(env, extra_env={"CBOX_STANDIN_ENGINE": "qemu"})
    sock_path = str(env.dir / "serial.sock")
    cfg = {"payload": {"kernel": str(QEMU_KERNEL), "cmdline": "console=ttyS0 reboot=k panic=-1"},
           "cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": 256 << 20},
           "serial": {"mode": "Socket", "socket": sock_path}, "console": {"mode": "Off"}}
    try:
        assert s.put("vm.create", cfg) == (204, None)
        assert s.put("vm.boot") == (204, None)
        client = serial_client(sock_path)
        text = read_until(client, b"Kernel panic - not syncing", timeout=120)
        assert b"Linux version" in text                       # replayed from the ring
        client.settimeout(60)
        while client.recv(65536):                             # the reboot drops the old socket
            pass
        client.close()
        deadline = time.monotonic() + 60
        data = b""
        while b'"rebooted"' not in data:
            assert time.monotonic() < deadline, s.output()
            try:
                data += os.read(rfd, 65536)
            except BlockingIOError:
                time.sleep(0.1)
        assert stat_is_socket(sock_path) and s.state() == "Running"
        log = s.log_file.read_text()
        assert "QMP SHUTDOWN (reason guest-reset)" in log and "VM reset event" in log
        assert s.put("vmm.shutdown")[0] == 200 and s.wait_exit(10) == 0
        _, events = read_events(rfd, data=data)
    finally:
        os.close(rfd)
    got = names(events)
    assert got[:5] == ["vmm starting", "vm booting", "vm booted", "vm rebooting", "vm rebooted"], got
    assert got[-3:] == ["vm shutdown", "vm deleted", "vmm shutdown"], got
    assert not os.path.exists(sock_path)


# ---- vCPU error and guest panic (test hooks) ---------------------------------------

def test_vcpu_error_exits_0_like_a_poweroff(env, chv_schema):
    """SIGUSR1 plays a vCPU error: exit code 0 and the events of a power-off;
    only the log says "VM exit event" (not "VM guest exit event")."""
    s, rfd = events_standin(env)
    try:
        s.proc.send_signal(signal.SIGUSR1)                  # no VM: ignored
        assert s.put("vm.create", s.config(net=False, cmdline="cbox.vm=vcpu"))[0] == 204
        assert s.put("vm.boot")[0] == 204
        assert vsock_command(s, "info").startswith(b"{")
        wait_for(lambda: "SIGUSR1 (vCPU error): no VM is running, ignored" in s.log_file.read_text())
        s.proc.send_signal(signal.SIGUSR1)
        assert s.wait_exit(10) == 0
        _, events = read_events(rfd)
    finally:
        os.close(rfd)
    assert names(events) == ["vmm starting", "vm booting", "vm booted", "vm shutdown", "vm deleted",
                             "vmm shutdown"]
    log = s.log_file.read_text()
    assert "ERROR:fake_chv.py -- VCPU generated error: VcpuRun(" in log
    assert "VM exit event" in log and "VM guest exit event" not in log
    assert wait_gone(lambda: agent_pids(env.dir), 5) == [] and not os.path.exists(s.vsock)


def test_guest_panic_hook(env, chv_schema):
    """SIGUSR2 plays a guest kernel panic: console text, the pvpanic event (only
    with "pvpanic": true), then panic=-1 resets (File serial truncated: the panic
    text is gone), panic=0 hangs, panic=N resets after N seconds."""
    s, rfd = events_standin(env)
    sock_path = str(env.dir / "vm.serial.sock")
    try:
        cfg = s.config(net=False, cmdline="cbox.vm=pan reboot=k panic=-1", pvpanic=True)
        assert s.put("vm.create", cfg)[0] == 204 and s.put("vm.boot")[0] == 204
        assert vsock_command(s, "info").startswith(b"{")
        [agent] = agent_pids(env.dir)
        s.proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: agent_pids(env.dir) not in ([], [agent]), what=s.output())
        assert json.loads(vsock_command(s, "info"))["hostname"] == "pan" and s.state() == "Running"
        assert "Kernel panic" not in s.serial.read_text()          # File::create at the reboot
        assert "VM reset event" in s.log_file.read_text() and "pvpanic got guest event panic" in s.log_file.read_text()
        assert s.put("vm.delete")[0] == 204
        # Socket mode: a client sees the panic before the reboot cuts it off; panic=1
        cfg = s.config(net=False, cmdline="cbox.vm=pan1 panic=1",
                       serial={"mode": "Socket", "socket": sock_path})
        assert s.put("vm.create", cfg)[0] == 204 and s.put("vm.boot")[0] == 204
        client = serial_client(sock_path)
        read_until(client, b"test-agent: ready\n")
        [agent] = agent_pids(env.dir)
        s.proc.send_signal(signal.SIGUSR2)
        text = read_until(client, b"Rebooting in 1 seconds..\n")
        assert b"Kernel panic - not syncing: cbox-standin: guest panic" in text
        wait_for(lambda: proc_state(agent) == "T")               # the panicked guest runs no more
        client.settimeout(10)
        while client.recv(65536):
            pass
        client.close()
        assert json.loads(vsock_command(s, "info"))["hostname"] == "pan1"
        assert s.put("vm.delete")[0] == 204
        # panic=0 (no pvpanic): the guest hangs, the VM stays Running
        cfg = s.config(net=False, cmdline="cbox.vm=pan0")
        assert s.put("vm.create", cfg)[0] == 204 and s.put("vm.boot")[0] == 204
        assert vsock_command(s, "info").startswith(b"{")
        [agent] = agent_pids(env.dir)
        s.proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: "---[ end Kernel panic" in s.serial.read_text())
        assert proc_state(agent) == "T" and s.state() == "Running"
        assert s.put("vmm.shutdown")[0] == 200 and s.wait_exit(10) == 0
        _, events = read_events(rfd)
    finally:
        os.close(rfd)
    assert names(events) == [
        "vmm starting", "vm booting", "vm booted", "guest panic", "vm rebooting", "vm rebooted",
        "vm shutdown", "vm deleted",
        "vm booting", "vm booted", "vm rebooting", "vm rebooted", "vm shutdown", "vm deleted",
        "vm booting", "vm booted", "vm shutdown", "vm deleted", "vmm shutdown"]
    assert [e["properties"] for e in events if e["source"] == "guest"] == [{"event": "panic"}]
    assert wait_gone(lambda: agent_pids(env.dir), 5) == []



def test_vmm_shutdown_answers_200_empty_and_socket_without_path_crashes(env, chv_schema):
    """v53: vmm.shutdown is 200 with Content-Length 0 (http_endpoint.rs VmmShutdown);
    serial mode Socket without serial.socket panics the VMM thread: 500, exit 1."""
    s = env.standin()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(s.api_sock)
        c.sendall(b"PUT /api/v1/vmm.shutdown HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = c.recv(4096)
            assert chunk, reply
            reply += chunk
    head = reply.split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert head[0].startswith("HTTP/1.1 200") and "Content-Length: 0" in head, head
    assert s.wait_exit(5) == 0
    s2 = env.standin(name="crash")
    cfg = s2.config(net=False, serial={"mode": "Socket"})
    assert s2.put("vm.create", cfg) == (500, ["Error from API", "API response receive error",
                                              "receiving on a closed channel"])
    assert s2.wait_exit(5) == 1
    assert "panicked" in s2.log_file.read_text()


def newc_cpio(entries):
    """An uncompressed newc cpio of (name, mode, data) entries, with its trailer."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        out += b"070701" + "".join(f"{v:08X}" for v in fields).encode() + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def test_qemu_engine_pvpanic(env, chv_schema):
    """QEMU engine with "pvpanic": true: a guest that loads pvpanic_pci and panics
    (sysrq c, typed on the Socket serial) gives the event source guest, event
    panic, then its panic=-1 reset rebuilds the VM (vm rebooting, vm rebooted)."""
    need_qemu_kernel()
    mods = REPO / "build" / "kernel" / "modules" / "kernel" / "drivers" / "misc" / "pvpanic"
    initramfs = REPO / "out" / "initramfs.cpio.gz"
    if not (mods / "pvpanic-pci.ko").exists() or not initramfs.exists():
        pytest.skip("pvpanic modules or initramfs missing (make images)")
    image = env.dir / "initramfs-pvpanic"
    base = initramfs.read_bytes()
    base += b"\0" * (-len(base) % 4)          # the kernel takes a following cpio at a 4-byte boundary
    image.write_bytes(base + newc_cpio(
        [(name, 0o100644, (mods / name).read_bytes()) for name in ("pvpanic.ko", "pvpanic-pci.ko")]))
    s, rfd = events_standin(env, extra_env={"CBOX_STANDIN_ENGINE": "qemu"})
    sock_path = str(env.dir / "serial.sock")
    cfg = {"payload": {"kernel": str(QEMU_KERNEL), "initramfs": str(image),
                       "cmdline": "console=ttyS0 reboot=k panic=-1 rdinit=/bin/sh"},
           "cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": 256 << 20}, "pvpanic": True,
           "serial": {"mode": "Socket", "socket": sock_path}, "console": {"mode": "Off"}}
    data = b""
    try:
        assert s.put("vm.create", cfg) == (204, None)
        assert s.put("vm.boot") == (204, None)
        client = serial_client(sock_path)
        read_until(client, b"job control turned off", timeout=120)   # busybox sh on ttyS0
        client.sendall(b"mount -t proc proc /proc; insmod /pvpanic.ko; insmod /pvpanic-pci.ko; "
                       b"echo loaded-$((6*7))\n")
        text = read_until(client, b"loaded-42", timeout=30)
        client.sendall(b"echo c > /proc/sysrq-trigger\n")
        text += read_until(client, b"Kernel panic - not syncing", timeout=60)
        assert b"can't insert" not in text, text.decode(errors="replace")[-3000:]
        client.close()
        deadline = time.monotonic() + 60
        while b'"rebooted"' not in data:
            assert time.monotonic() < deadline, s.output()
            try:
                data += os.read(rfd, 65536)
            except BlockingIOError:
                time.sleep(0.1)
        assert s.put("vmm.shutdown")[0] == 200 and s.wait_exit(10) == 0
        _, events = read_events(rfd, data=data)
    finally:
        os.close(rfd)
    got = names(events)
    assert got[:6] == ["vmm starting", "vm booting", "vm booted", "guest panic", "vm rebooting",
                       "vm rebooted"], got
    assert events[3]["properties"] == {"event": "panic"}
    log = s.log_file.read_text()
    assert "QMP GUEST_PANICKED" in log and "pvpanic got guest event panic" in log


def test_guest_reset_with_network(env, chv_schema):
    """A reset rebuilds the guest's network too: the old guest VMM frees the tap and
    undoes its kernel relay, the new one attaches again; exec traffic works after."""
    env.bridge()
    s = env.standin()
    boot_guest(env, s)
    [agent] = agent_pids(env.dir)
    with env.ns.connect((GUEST_IP, 4031), timeout=5) as c:
        c.sendall(b"reboot\n")
        assert c.recv(10) == b"bye\n"
    wait_for(lambda: agent_pids(env.dir) not in ([], [agent]), what=s.output())
    assert guest_info(env.ns, s)["hostname"] == "vm" and echo(env.ns, 1 << 16)
    assert len(host_veths(env.ns)) == 1 and s.state() == "Running"
    assert s.put("vmm.shutdown")[0] == 200 and s.wait_exit(5) == 0
    assert host_veths(env.ns) == [] and not tap_clsact(env.ns)


# ---- vCPUs: a guest held to boot_vcpus -----------------------------------------------------

def cpu_cgroup_or_skip():
    point, version = fake_chv.cpu_hierarchy()
    if point is None:
        pytest.skip(f"no cgroup hierarchy with the cpu controller here ({version})")
    return point, version


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_guest_is_held_to_its_vcpus(env, chv_schema):
    """A real guest's processes run on boot_vcpus vCPU threads: two busy processes in a
    1-vCPU guest get one CPU between them, not two.  The guest's cpu cgroup goes with it,
    and one a killed stand-in left behind goes when the next guest starts."""
    point, version = cpu_cgroup_or_skip()
    parent = fake_chv.guest_cgroup_parent(point, version)      # the stand-in's cgroup is this test's
    orphan = parent / f"{fake_chv.CPU_CGROUP_PREFIX}{dead_pid()}"
    orphan.mkdir()
    try:
        s = env.standin(name="cpus")
        assert s.put("vm.create", s.config(net=False, cmdline="cbox.vm=cpus"))[0] == 204
        assert s.put("vm.boot")[0] == 204
        path = parent / f"{fake_chv.CPU_CGROUP_PREFIX}{s.proc.pid}"
        burn = json.loads(vsock_command(s, "burn 2 1.5"))
        assert f"/{path.name}\n" in burn["cgroup"], (burn, s.serial.read_text())
        # 1 vCPU: at most one CPU's time (a loaded host gives less; without the cgroup,
        # on two idle CPUs, about 2x)
        assert burn["cpu"] <= 1.2 * burn["wall"], burn
        print(f"\n2 busy processes in a 1-vCPU guest: {burn['cpu'] / burn['wall']:.2f} CPUs")
        if version == 1:
            assert (path / "cpu.cfs_quota_us").read_text().strip() == str(fake_chv.CPU_PERIOD_US)
            assert (path / "cpu.shares").read_text().strip() == "1024"
        else:
            assert (path / "cpu.max").read_text().split() == [str(fake_chv.CPU_PERIOD_US)] * 2
        assert not orphan.exists()                      # its stand-in (pid) is dead
        # the stand-in may see the hierarchy elsewhere (fake_chv.cpu_hierarchy: `ip netns exec` hides /sys's)
        assert re.search(r"cbox-standin: cpus: 1 vCPU\(s\): the guest's processes held to 1 CPU\(s\) "
                         rf"\(cpu cgroup /\S+/{path.name}\)\n", s.serial.read_text()), s.serial.read_text()
        assert s.put("vmm.shutdown")[0] == 200
        assert s.wait_exit(10) == 0
        assert not path.exists()
    finally:
        with contextlib.suppress(OSError):
            orphan.rmdir()


def test_a_guest_with_two_vcpus_gets_their_weight_and_quota(env, chv_schema):
    point, version = cpu_cgroup_or_skip()
    s = env.standin(name="cpus2")
    cfg = s.config(net=False, cmdline="cbox.vm=cpus2")
    cfg["cpus"] = {"boot_vcpus": 2, "max_vcpus": 2}
    assert s.put("vm.create", cfg)[0] == 204
    assert s.put("vm.boot")[0] == 204
    assert vsock_command(s, "info").startswith(b"{")
    path = fake_chv.guest_cgroup_parent(point, version, s.proc.pid) / f"{fake_chv.CPU_CGROUP_PREFIX}{s.proc.pid}"
    if version == 1:
        assert (path / "cpu.cfs_quota_us").read_text().strip() == str(2 * fake_chv.CPU_PERIOD_US)
        assert (path / "cpu.shares").read_text().strip() == "2048"
    else:
        assert (path / "cpu.max").read_text().split() == [str(2 * fake_chv.CPU_PERIOD_US), str(fake_chv.CPU_PERIOD_US)]
        assert (path / "cpu.weight").read_text().strip() == "200"
    [agent] = agent_pids(env.dir)
    assert f"/{path.name}\n" in Path(f"/proc/{agent}/cgroup").read_text()
    assert s.put("vmm.shutdown")[0] == 200
    assert s.wait_exit(10) == 0
    assert not path.exists()


def test_without_the_vcpu_limit_the_console_says_so(env, chv_schema):
    s = env.standin(name="nocpus", extra_env={"CBOX_STANDIN_VCPU_LIMIT": "0"})
    assert s.put("vm.create", s.config(net=False, cmdline="cbox.vm=nocpus"))[0] == 204
    assert s.put("vm.boot")[0] == 204
    assert vsock_command(s, "info").startswith(b"{")
    assert ("cbox-standin: cpus: NOT held to 1 vCPU(s) (CBOX_STANDIN_VCPU_LIMIT=0): the guest's processes "
            "may use every host CPU") in s.serial.read_text()
    assert not any(p.name == f"{fake_chv.CPU_CGROUP_PREFIX}{s.proc.pid}"
                   for p in (fake_chv.cpu_hierarchy()[0] or Path("/nonexistent")).glob(f"{fake_chv.CPU_CGROUP_PREFIX}*"))
    assert s.put("vmm.shutdown")[0] == 200
