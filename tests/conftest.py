"""Shared pytest fixtures: private network namespaces and leak checks.

Every test that touches the network runs inside a network namespace it
creates itself (contract section 5), so no packet to a guest address ever
leaves this machine's sandbox.
"""
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from procutil import run

REPO = Path(__file__).resolve().parents[1]
# cbox.py and guest_agent.py importable from every test (pytest puts tests/ on the path)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
CHV_SCHEMA = SHARED / "cloud-hypervisor" / "cloud-hypervisor.json"


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, taps, iptables)")


class NetNS:
    """A named network namespace created for one test; `prefix` runs commands in it."""

    def __init__(self, name):
        self.name = name
        self.prefix = ["ip", "netns", "exec", name]

    def run(self, *args, check=True, **kw):
        return run(*self.prefix, *args, check=check, **kw)

    def popen(self, args, **kw):
        return subprocess.Popen(self.prefix + list(args), **kw)

    def pids(self):
        r = run("ip", "netns", "pids", self.name, check=False)
        return [int(p) for p in r.stdout.split()]

    def links(self):
        return self.run("ip", "-o", "link", "show").stdout

    def bridge_with_tap(self, tap, address):
        """A bridge br0 at `address` (CIDR) with a persistent tap on it, all up: a VM's network
        as cbox.py makes it, for tests that run a hypervisor or an engine without cbox.py."""
        self.run("ip", "link", "add", "br0", "type", "bridge")
        self.run("ip", "addr", "add", address, "dev", "br0")
        self.run("ip", "link", "set", "br0", "up")
        self.run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        self.run("ip", "link", "set", tap, "master", "br0", "up")


def unique(prefix="cbt"):
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session", autouse=True)
def no_vcpu_cgroups_left():
    """The stand-ins' vCPU cgroups (fake_chv.GuestCpus) go when their guest ends, or when the
    next guest starts after a SIGKILL; those of the run's last killed stand-ins go here."""
    yield
    import fake_chv
    fake_chv.remove_orphan_cpu_cgroups()


@pytest.fixture
def netns():
    """A fresh network namespace with lo up; every process in it is killed at the end."""
    _need_root()
    if not shutil.which("ip"):
        pytest.skip("iproute2 (ip) is not installed")
    name = unique("cbtns")
    run("ip", "netns", "add", name)
    ns = NetNS(name)
    ns.run("ip", "link", "set", "lo", "up")
    try:
        yield ns
    finally:
        for pid in ns.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        run("ip", "netns", "del", name, check=False)


@pytest.fixture
def chv_schema():
    """Path of Cloud Hypervisor's OpenAPI JSON, or skip where ../shared is absent."""
    if not CHV_SCHEMA.exists():
        pytest.skip(f"{CHV_SCHEMA} is absent (../shared is beside development and CI checkouts only)")
    return CHV_SCHEMA


# ---- talking to servers inside a namespace from the test process -------------

import http.client  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from nsutil import CallbackURLServer, socket_in_ns  # noqa: E402

def socket_in_netns(ns_name, family=socket.AF_INET, type=socket.SOCK_STREAM):
    """A socket created inside the named network namespace."""
    return socket_in_ns(f"/run/netns/{ns_name}", family, type)


def _ns_connect(self, addr, timeout=10.0):
    sock = socket_in_netns(self.name)
    sock.settimeout(timeout)
    sock.connect(addr)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _ns_listen(self, addr=("127.0.0.1", 0)):
    sock = socket_in_netns(self.name)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(64)
    return sock


NetNS.connect = _ns_connect
NetNS.listen = _ns_listen


class Api:
    """A small REST client for cbox.py running inside a namespace."""

    def __init__(self, ns, port, token=None, host="127.0.0.1"):
        self.ns, self.port, self.token, self.host = ns, port, token, host

    def request(self, method, path, body=None, raw=None, headers=None, timeout=120.0):
        sock = self.ns.connect((self.host, self.port), timeout)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        conn.sock = sock
        hdrs = dict(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        if self.token:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        ctype = resp.getheader("Content-Type", "")
        if ctype.startswith("application/json"):
            return resp.status, json.loads(payload)
        return resp.status, payload.decode("utf-8", "replace")

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def start_vm(self, name, **fields):
        status, vm = self.post("/v1/vms", dict(vmName=name, **fields))
        assert status == 200, vm
        return vm

    def exec(self, name, cmd, **fields):
        status, result = self.post(f"/v1/vms/{name}/exec", dict(cmd=cmd, **fields))
        assert status == 200, result
        return result


STANDIN = REPO / "tests" / "fake_chv.py"


class CboxServer:
    """cbox.py serving inside a test namespace with the stand-in hypervisor."""

    def __init__(self, ns, tmp_path, run_dir, **overrides):
        self.ns, self.tmp = ns, tmp_path
        self.run_dir = run_dir
        self.state_dir = tmp_path / "state"
        images = tmp_path / "images"
        images.mkdir(exist_ok=True)
        for name in ("vmlinux", "initramfs.img", "rootfs.ext4"):
            (images / name).write_bytes(b"stand-in image\n")
        self.settings = {
            "host": "127.0.0.1", "port": 7000, "state_dir": str(self.state_dir), "run_dir": str(self.run_dir),
            "bridge_name": "cbox0", "bridge_ip": "10.20.1.1/24", "bridge_subnet": "10.20.1.0/24",
            "nat_interface": "none", "dns": "10.20.1.1", "chv_bin": str(STANDIN),
            "kernel": str(images / "vmlinux"), "initramfs": str(images / "initramfs.img"),
            "rootfs": str(images / "rootfs.ext4"), "stateful_size_in_mb": 64, "boot_timeout_s": 30,
            "callback_timeout_s": 5, "exec_timeout_s": 60, "shutdown_timeout_s": 3,
        }
        self.settings.update(overrides)
        self.config = tmp_path / "config.yaml"
        lines = ["hostservices:", "  restserver:"]
        for k, v in self.settings.items():
            lines.append(f"    {k}: {json.dumps(v)}")
        self.config.write_text("\n".join(lines) + "\n")
        self.log_path = tmp_path / "cbox.log"
        self.proc = None
        self.api = Api(ns, self.settings["port"], token=self.settings.get("api_token") or None)

    def start(self, timeout=20.0, env=None, log_to=None):
        """Start `cbox.py serve`; its stdout and stderr go to log_path, or to the file descriptor
        log_to (e.g. a pipe's write end, which the caller then owns; log() reads nothing)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.logf = open(self.log_path, "ab")
        self.proc = self.ns.popen([sys.executable, str(REPO / "cbox.py"), "serve", "--config", str(self.config)],
                                  stdout=self.logf if log_to is None else log_to, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cbox.py exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.api.get("/v1/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"cbox.py did not answer within {timeout}s:\n{self.log()}")

    def stop(self, sig=signal.SIGTERM, timeout=20.0):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        self.logf.close()

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def vmm_api(self, cid, method, endpoint, timeout=30):
        """Call a VM's hypervisor API directly, as an operator could (Unix sockets need no
        netns); returns (status, parsed JSON body or None). Cloud Hypervisor keeps the
        connection open: the body is read by its Content-Length."""
        class Conn(http.client.HTTPConnection):
            def connect(conn):
                conn.sock = socket.socket(socket.AF_UNIX)
                conn.sock.settimeout(timeout)
                conn.sock.connect(str(self.run_dir / str(cid) / "api.sock"))
        conn = Conn("localhost", timeout=timeout)
        try:
            conn.request(method, f"/api/v1/{endpoint}")
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(body) if body.strip() else None

    def received_all(self, client):
        """Whether cbox.py accepted the connection of `client` (a socket of the test) and read
        all it sent: the server side's Recv-Q is empty."""
        port, client_port = self.settings["port"], client.getsockname()[1]
        out = self.ns.run("ss", "-Htn", "state", "established",
                          f"( sport = :{port} and dport = :{client_port} )").stdout
        return out.split()[:1] == ["0"]

    def taps(self):
        return [line.split(":")[1].strip().split("@")[0] for line in self.ns.links().splitlines()
                if ": cbt" in line]

    def vmm_pids(self):
        """pids of stand-in hypervisor processes in this namespace."""
        out = []
        for pid in self.ns.pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"fake_chv.py") for part in cmd):
                out.append(pid)
        return out

    def assert_clean(self):
        """Nothing of any VM is left: taps, processes, records, files, sockets."""
        vms = self.state_dir / "vms"
        deadline = time.monotonic() + 10       # a VM ended at its deadline is torn down in the background
        while time.monotonic() < deadline and (self.taps() or self.vmm_pids() or vms.exists() and any(vms.iterdir())):
            time.sleep(0.1)
        assert self.taps() == [], self.ns.links()
        assert self.vmm_pids() == []
        assert not vms.exists() or list(vms.iterdir()) == []
        assert not self.run_dir.exists() or list(self.run_dir.iterdir()) == []

    def cleanup(self):
        try:
            self.stop(signal.SIGKILL)
        except Exception:
            pass
        subprocess.run(["rm", "-rf", str(self.run_dir)])


@pytest.fixture
def cbox_factory(netns, tmp_path):
    """Make cbox.py servers in one namespace (several in turn for restart tests)."""
    made = []
    run_dir = Path("/tmp") / unique("cbr")      # short: socket paths hold 107 bytes

    def make(**overrides):
        server = CboxServer(netns, tmp_path, run_dir, **overrides)
        made.append(server)
        return server

    yield make
    for server in made:
        server.cleanup()


@pytest.fixture
def callback_server(netns):
    """HTTP servers in the test namespace (callback URLs, events_url): make(reply, listener)
    with reply(body) -> (status, bytes); each records its calls."""
    made = []

    def make(reply=lambda body: (200, b'{"ok": true}'), listener=None):
        server = CallbackURLServer(listener or netns.listen(("127.0.0.1", 0)), reply)
        made.append(server)
        return server
    yield make
    for server in made:
        server.close()


@pytest.fixture
def cbox_server(cbox_factory):
    server = cbox_factory().start()
    yield server
    if server.proc.poll() is None:
        assert server.api.delete("/v1/vms", timeout=60)[0] == 200
        server.assert_clean()          # no test leaves a tap, process, record or socket behind
