"""Callbacks through a real guest kernel's vsock (issue 18).

The same callback tests run on both engines of the stand-in hypervisor: the
process engine (the guest's callbacks take the Unix-socket override
CBOX_CALLBACK_SOCKET) and the QEMU engine, where the out/ images boot for
real and a vhost-device-vsock process per VM is the virtio-vsock device, its
host side Cloud Hypervisor's hybrid vsock at the VmConfig's vsock.socket (see
tests/qemu_engine.py). The QEMU cases skip with a reason when the images
(`make images`), QEMU or vhost-device-vsock are missing. Guest boots under
software emulation are slow: each test boots as few VMs as it can.
"""
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

from conftest import unique
from procutil import wait_for
from test_agent import CallbackServer
from test_callback_trust import SECRET, readme_verifier
from test_images import (BOOT_TIMEOUT, CMDLINE, HOST_IP, INITRAMFS, KERNEL, ROOTFS, console, guest_exec,
                         image_server, need_images, need_qemu, need_vhost_vsock, ns_http, tail, vm_config,
                         wait_ready)
from test_pool import wait_ready as wait_pool_ready
from test_standin import StandIn, UnixHTTPConnection

ENGINES = ["process", "qemu"]
VSOCK_DEVICE = b"vhost-device-vsock"


def need_real_guest():
    need_images(KERNEL, INITRAMFS, ROOTFS)
    need_qemu()
    need_vhost_vsock()


def engine_server(cbox_factory, engine, **overrides):
    """cbox.py on the stand-in with `engine` (qemu: the out/ images, a real vsock device)."""
    if engine == "qemu":
        need_real_guest()
        return image_server(cbox_factory, **overrides)
    return cbox_factory(**overrides).start()


def start(api, name, **fields):
    status, vm = api.post("/v1/vms", dict(vmName=name, **fields), timeout=BOOT_TIMEOUT + 60)
    assert status == 200, vm
    return vm


def device_pids(ns, uds_path=None):
    """pids of vhost-device-vsock processes in the namespace (serving uds_path, if given)."""
    found = []
    for pid in ns.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(VSOCK_DEVICE) and (uds_path is None or str(uds_path).encode() in argv):
            found.append(pid)
    return found


# ---- the same callback test on both engines ---------------------------------------------

def echo_reply(body):
    params = body["params"]
    if isinstance(params, dict) and params.get("kind") == "error":
        return 200, json.dumps({"error": "nope"}).encode()
    return 200, json.dumps({"result": {"echo": params, "vm": body["vmName"]}}).encode()


@pytest.mark.parametrize("engine", ENGINES)
def test_callbacks_from_a_claimed_pool_vm(cbox_factory, callback_server, engine):
    """A VM claimed from the warm pool calls back from the shell and from Python: each
    callback carries the VM's new name (body and X-CBox-VM), is signed (the README's
    verifier accepts it) and carries the calling command's execId; errors reach the caller."""
    cb = callback_server(echo_reply)
    server = engine_server(cbox_factory, engine, pool_size=1, callback_secret=SECRET)
    api = server.api
    wait_pool_ready(api, 1, timeout=BOOT_TIMEOUT + 60)
    vm = start(api, "cbguest", callbackUrl=cb.url)
    assert "claim step vm=cbguest" in server.log()
    # which path the guest's callbacks take: the kernel's vsock, or the Unix socket override
    r = api.exec("cbguest", 'echo "${CBOX_CALLBACK_SOCKET:-vsock}"; ls /dev/vsock')
    if engine == "qemu":
        assert r["stdout"].split() == ["vsock", "/dev/vsock"], r
    else:
        assert r["stdout"].split()[0] == f"{server.run_dir}/{vm['cid']}/vsock.sock_4032", r

    r = api.exec("cbguest", """cbox_callback greet '{"a": 1}'""")
    assert r["exitCode"] == 0, r
    assert json.loads(r["stdout"]) == {"echo": {"a": 1}, "vm": "cbguest"}
    assert cb.calls[-1] == {"vmName": "cbguest", "method": "greet", "params": {"a": 1}, "execId": r["execId"]}
    r = api.exec("cbguest", """cbox_callback m '{"kind": "error"}'""")
    assert r["exitCode"] == 1 and r["stderr"].strip() == "Error: nope", r
    script = ("import os\nfrom cbox_callback import callback, CallbackError\n"
              "print(callback('py', [1, 2], timeout=30)['echo'])\n"
              "try:\n    callback('m', {'kind': 'error'})\nexcept CallbackError as e:\n    print('raised', e)\n"
              "print(os.environ['CBOX_EXEC_ID'])\n")
    r = api.exec("cbguest", "python3 -", stdin=script)
    assert r["stdout"] == f"[1, 2]\nraised nope\n{r['execId']}\n", r
    assert cb.calls[-2] == {"vmName": "cbguest", "method": "py", "params": [1, 2], "execId": r["execId"]}

    verify = readme_verifier()
    assert len(cb.requests) == 4
    for headers, raw in cb.requests:
        assert verify(SECRET, headers, raw), dict(headers)
        assert headers.get("X-CBox-VM") == "cbguest"
    assert len({headers.get("X-CBox-Callback-Id") for headers, _ in cb.requests}) == 4


# ---- a hostile guest program floods the vsock ---------------------------------------------

# Connects to the host's callback listener as fast as it can: callers hammer callbacks
# (over the rate budget) while a hoarder opens connections and keeps them (over the
# connection budget), until SIGTERM; then prints what it got back.
FLOOD = r'''
import json, os, signal, socket, sys, threading, time
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
path = os.environ.get("CBOX_CALLBACK_SOCKET")
port = int(os.environ.get("CBOX_CALLBACK_PORT") or 4032)
stats = {"ok": 0, "rate": 0, "connections": 0, "other": 0, "connect_errors": 0, "held": 0}
lock = threading.Lock()

def count(key, n=1):
    with lock:
        stats[key] += n

def connect():
    s = socket.socket(socket.AF_UNIX) if path else socket.socket(socket.AF_VSOCK)
    s.settimeout(30)
    s.connect(path or (2, port))
    return s

def classify(line):
    return ("ok" if b'"result"' in line else "rate" if b"a second per VM" in line else
            "connections" if b"open callback connections" in line else "other")

def caller():
    while not stop.is_set():
        try:
            s = connect()
            f = s.makefile("rb")
            while not stop.is_set():
                s.sendall(b'{"method": "flood"}\n')
                line = f.readline()
                if not line:
                    break
                count(classify(line))
            s.close()
        except OSError:
            count("connect_errors")
            time.sleep(0.005)

def hoarder():
    held = []
    while not stop.is_set():
        try:
            held.append(connect())
        except OSError:
            count("connect_errors")
            time.sleep(0.005)
        if len(held) >= 64:       # the refused ones got an error line and EOF: read it, drop them
            for s in held:
                s.settimeout(0.2)
                try:
                    line = s.recv(4096)
                except socket.timeout:
                    continue       # still open: a connection slot the guest keeps
                except OSError:
                    line = b""
                count(classify(line) if line else "other")
                s.close()
            held = [s for s in held if s.fileno() >= 0]
            with lock:
                stats["held"] = len(held)

threads = [threading.Thread(target=caller) for _ in range(4)] + [threading.Thread(target=hoarder)]
for t in threads:
    t.start()
print("flooding", flush=True)
stop.wait(600)
for t in threads:
    t.join()
print(json.dumps(stats), flush=True)
'''


@pytest.mark.parametrize("engine", ENGINES)
def test_a_guest_flooding_its_vsock_leaves_cbox_and_another_vm_healthy(cbox_factory, callback_server, engine):
    """A guest program opens callback connections and sends callbacks as fast as it can:
    it gets refusals (rate, open connections); meanwhile cbox.py answers, the other VM's
    callbacks and the flooding VM's own execs work; the budgets are counted."""
    cb = callback_server(lambda body: (200, b'{"result": "pong"}'))
    server = engine_server(cbox_factory, engine, callback_max_connections=4, callback_rate_per_s=20)
    api = server.api
    start(api, "flood", callbackUrl=cb.url)
    start(api, "calm", callbackUrl=cb.url)
    status, run = api.post("/v1/vms/flood/exec", {"cmd": "exec python3 -", "stdin": FLOOD, "blocking": False,
                                                  "timeout": 900})
    assert status == 200, run

    def flood_output():
        status, r = api.get(f"/v1/vms/flood/exec/{run['execId']}")
        assert status == 200 and (r["running"] or r["exitCode"] == 0), {k: r[k] for k in ("exitCode", "signal", "stdout", "stderr", "error")}
        return r

    wait_for(lambda: "flooding" in flood_output()["stdout"], 120, interval=0.5, what="the flood to start")
    wait_for(lambda: sum(c["vmName"] == "flood" for c in cb.calls) >= 20, 120, interval=0.5,
             what="the flood's callbacks")
    for i in range(3):                  # under the flood: cbox.py, the other VM, the flooding VM
        assert api.get("/v1/health", timeout=30)[0] == 200
        r = api.exec("calm", f"""cbox_callback ping '{{"i": {i}}}'""")
        assert r["exitCode"] == 0 and json.loads(r["stdout"]) == "pong", r
        assert api.exec("flood", "echo still")["stdout"] == "still\n"
    assert flood_output()["running"], "the checks above ran while the flood went on"
    status, body = api.post(f"/v1/vms/flood/exec/{run['execId']}/signal", {"signal": "TERM"})
    assert status == 200, body
    r = wait_for(lambda: (lambda r: not r["running"] and r)(flood_output()), 120, interval=0.5,
                 what="the flood to end")
    stats = json.loads(r["stdout"].splitlines()[-1])
    print(f"\n{engine}: the flooding guest got {stats}")
    assert stats["ok"] > 0 and stats["rate"] > 0 and stats["connections"] > 0, stats
    assert stats["other"] == 0, stats
    calm = [c for c in cb.calls if c["vmName"] == "calm"]
    assert len(calm) == 3
    status, metrics = api.get("/v1/metrics")
    for counter in ("refused_rate", "refused_connections"):
        value = next(line for line in metrics.splitlines()
                     if line.startswith(f'cbox_callback_bridge_events_total{{event="{counter}"}}'))
        assert float(value.split()[-1]) > 0, value
    assert api.delete("/v1/vms", timeout=120)[0] == 200
    server.assert_clean()
    assert device_pids(server.ns) == []


# ---- a guest reset under the stand-in: the vsock socket is bound again ---------------------------

def test_guest_reset_binds_the_vsock_socket_again(netns):
    """The stand-in with the QEMU engine: a guest reset (sysrq b) rebuilds the VM in the
    same process and its vsock socket is re-created (a new file, a new device process), as
    Cloud Hypervisor does; the rebooted guest's callbacks reach the host again. kill -9 of
    the stand-in then leaves no QEMU and no vsock device behind."""
    need_real_guest()
    work = Path(tempfile.mkdtemp(prefix="cbv", dir="/tmp"))     # short: socket paths <= 107 bytes
    tap = unique("cbit")[:15]
    netns.bridge_with_tap(tap, f"{HOST_IP}/24")
    # QEMU's microvm has no i8042: a triple fault resets at once (see test_images)
    cfg = vm_config(work, tap=tap, cmdline=CMDLINE + " reboot=t")
    vsock = Path(cfg["vsock"]["socket"])
    standin = StandIn(netns, work, extra_env={"CBOX_STANDIN_ENGINE": "qemu"})
    listener = CallbackServer(f"{vsock}_4032")          # the host side of callbacks, without cbox.py

    class Guest:     # what wait_ready needs to tell a dead VM
        alive = staticmethod(lambda: standin.proc.poll() is None)

    def callback_works(n):
        r = guest_exec(netns, f"""cbox_callback echo '{{"n": {n}}}'""")
        assert r["exitCode"] == 0 and json.loads(r["stdout"]) == {"method": "echo", "params": {"n": n}}, \
            f"{r}\n{standin.output()[-3000:]}"

    try:
        assert standin.put("vm.create", cfg) == (204, None)
        boot = UnixHTTPConnection(standin.api_sock, timeout=120)     # QEMU and its device start in it
        boot.request("PUT", "/api/v1/vm.boot")
        assert boot.getresponse().status == 204, standin.output()
        boot.close()
        wait_ready(netns, Guest, work, time.monotonic() + BOOT_TIMEOUT)
        callback_works(1)
        first = vsock.stat()
        (device,) = device_pids(netns, vsock)
        status, r = ns_http(netns, "POST", "/exec", {"cmd": "sleep 0.5; echo b > /proc/sysrq-trigger",
                                                     "blocking": False})
        assert status == 200, r
        wait_for(lambda: "VM reset event" in standin.log_file.read_text(), 60, interval=0.2, what="the reset")
        wait_ready(netns, Guest, work, time.monotonic() + BOOT_TIMEOUT)
        assert standin.state() == "Running"
        again_made = vsock.stat()          # an inode number may be reused: the birth time too
        assert (again_made.st_ino, again_made.st_ctime_ns) != (first.st_ino, first.st_ctime_ns), \
            "the vsock socket was not made again"
        (again,) = device_pids(netns, vsock)
        assert again != device, "the reset ended the old device and started another"
        callback_works(2)
        assert [request["params"] for request in listener.requests] == [{"n": 1}, {"n": 2}]
        qemu = [pid for pid in netns.pids() if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(qemu) == 1
        standin.proc.send_signal(signal.SIGKILL)
        standin.proc.wait(10)
        wait_for(lambda: not device_pids(netns) and not any(os.path.exists(f"/proc/{p}") for p in qemu),
                 10, interval=0.1, what="the guest's processes to die with the stand-in")
    finally:
        print(tail(console(work), 5))
        listener.close()
        standin.kill()
