"""`cbox.py selftest` (issue 8): the end-to-end check a new host runs first.

Run inside a network namespace of the test, with the stand-in hypervisor
(process engine: everything passes) and with its QEMU engine and the real
images from `make images` (everything passes over the guest's real vsock; without
vhost-device-vsock the callback step fails, and the hint must say why). Each run
must leave nothing behind: no tap, bridge, firewall chain, process, record or
file it created.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, STANDIN
from nsutil import CallbackURLServer

from test_images import BOOT_TIMEOUT, INITRAMFS, KERNEL, ROOTFS, need_images, need_qemu

CBOX = str(REPO / "cbox.py")
ROW = re.compile(r"^(?P<step>\S+(?: \S+)?)\s+(?P<result>PASS|FAIL|SKIP)\s+(?P<time>[0-9.]+ m?s)?\s*(?P<detail>.*)$")


def rows(output):
    """{step: (result, time text, detail)} of selftest's table."""
    found = {}
    for line in output.splitlines():
        m = ROW.match(line)
        if m:
            found[m.group("step")] = (m.group("result"), m.group("time"), m.group("detail"))
    return found


def hints(output):
    """{step: hint} from the hints section."""
    text = output.split("\nhints:\n", 1)[1] if "\nhints:\n" in output else ""
    found = {}
    for line in text.splitlines():
        if not line.startswith("  ") or line.startswith("   "):
            break
        step, _, hint = line.strip().partition(": ")
        found[step] = hint
    return found


def selftest(server, env=None, timeout=600):
    """Run `cbox.py selftest` with the server's config inside its namespace."""
    r = server.ns.run(sys.executable, CBOX, "selftest", "--config", str(server.config), check=False,
                      env=dict(os.environ, **(env or {})), timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def host_state(server):
    """What of cbox exists in the namespace and on disk: to compare before and after."""
    links = [line.split(":")[1].strip().split("@")[0] for line in server.ns.links().splitlines()]
    chains = server.ns.run("iptables", "-w", "-S", check=False).stdout
    return {"links": sorted(links), "cbox chains": "CBOX-" in chains,
            "state_dir": server.state_dir.exists(), "run_dir": server.run_dir.exists(),
            "pids": sorted(server.ns.pids())}


def test_selftest_passes_with_the_standin(cbox_factory):
    server = cbox_factory()
    before = host_state(server)
    rc, out = selftest(server)
    table = rows(out)
    assert rc == 0, out
    for step in ("preflight", "images", "server", "network", "start: spawn", "start: vm.create",
                 "start: vm.boot", "start: agent", "start", "exec", "callback", "destroy", "leftovers"):
        assert table.get(step, ("missing",))[0] == "PASS", f"{step}:\n{out}"
    assert "in-process" in table["server"][2]
    for step in ("start: spawn", "start: agent", "start", "exec", "callback", "destroy"):
        assert table[step][1], f"{step} has no time:\n{out}"
    assert "p50 of 20" in table["exec"][2] and "p50 of 20" in table["callback"][2], out
    assert out.rstrip().endswith("selftest: PASS"), out
    # the bridge, firewall chains, state_dir and run_dir did not exist before: all gone
    assert host_state(server) == before, out


def test_selftest_goes_through_a_running_server(cbox_factory):
    """A cbox.py serves the config (with an api_token): selftest uses its API and
    leaves its VMs, records and network alone."""
    cbox_server = cbox_factory(api_token="selftest-token").start()
    api = cbox_server.api
    api.start_vm("keep", callbackUrl="http://127.0.0.1:9/none")
    rc, out = selftest(cbox_server)
    table = rows(out)
    assert rc == 0, out
    assert "selftest uses its API" in table["server"][2], out
    assert "network" not in table, out              # the server's network is not touched
    name = re.search(r"(cbox-selftest-[0-9a-f]{8})", table["start"][2]).group(1)
    log = cbox_server.log()
    assert f"path=/v1/vms/{name}/exec" in log and f"VM destroyed vm={name}" in log
    status, listing = api.get("/v1/vms")
    assert [vm["vmName"] for vm in listing["vms"]] == ["keep"], listing
    assert api.exec("keep", "echo still")["stdout"] == "still\n"
    assert sorted(p.name for p in (cbox_server.state_dir / "vms").iterdir()) == ["keep", "keep.json"]
    assert api.delete("/v1/vms", timeout=60)[0] == 200
    cbox_server.assert_clean()


def test_selftest_refuses_a_port_held_by_another_program(cbox_factory):
    server = cbox_factory()
    listener = server.ns.listen(("127.0.0.1", server.settings["port"]))
    other = CallbackURLServer(listener, lambda body: (200, b"{}"))     # answers GET with 501
    try:
        rc, out = selftest(server)
    finally:
        other.close()
    assert rc == 1, out
    assert rows(out)["server"][0] == "FAIL" and "not as cbox.py" in hints(out)["server"], out
    assert rows(out)["start"][0] == "SKIP", out


def test_selftest_refuses_vms_of_a_stopped_server(cbox_factory):
    server = cbox_factory().start()
    server.api.start_vm("left")
    server.stop()                                     # SIGTERM: the VM keeps running
    record = server.state_dir / "vms" / "left.json"
    before = record.read_bytes()
    rc, out = selftest(server)
    table = rows(out)
    assert rc == 1, out
    assert table["server"][0] == "FAIL", out
    assert "cbox.py serve --config" in hints(out)["server"], out
    assert table["start"][0] == "SKIP" and table["exec"][0] == "SKIP", out
    assert record.read_bytes() == before
    again = cbox_factory().start()                   # the VM is still there and still works
    assert again.api.exec("left", "echo alive")["stdout"] == "alive\n"
    assert again.api.delete("/v1/vms", timeout=60)[0] == 200
    again.assert_clean()


@pytest.mark.parametrize("case", ["chv-not-executable", "kernel-missing", "hypervisor-exits"])
def test_selftest_failure_has_a_hint_and_leaves_nothing(cbox_factory, tmp_path, case):
    if case == "chv-not-executable":
        chv = tmp_path / "cloud-hypervisor"
        shutil.copy(STANDIN, chv)
        chv.chmod(0o644)
        server = cbox_factory(chv_bin=str(chv))
        step, words = "preflight", ["chv_bin", str(chv)]
    elif case == "kernel-missing":
        server = cbox_factory(kernel=str(tmp_path / "no-such-vmlinux"))
        step, words = "images", ["no-such-vmlinux", "make images"]
    else:
        server = cbox_factory(chv_bin="/bin/false")
        step, words = "start", ["hypervisor did not start", "exited with code 1"]
    before = host_state(server)
    rc, out = selftest(server)
    table, hint = rows(out), hints(out)
    assert rc == 1, out
    assert table[step][0] == "FAIL", out
    assert all(w in hint.get(step, "") for w in words), out
    assert table["exec"][0] == "SKIP" and table["callback"][0] == "SKIP", out
    if case == "hypervisor-exits":
        assert table["start: spawn"][0] == "FAIL" and table["leftovers"][0] == "PASS", out
    else:
        assert table["start"][0] == "SKIP", out
    assert host_state(server) == before, out


def interrupted_selftest(server, line_start, wait, env=None):
    """Run selftest in the server's namespace; once a line starts with `line_start`,
    call wait(), then send SIGINT. Returns (process, whole output)."""
    proc = server.ns.popen([sys.executable, CBOX, "selftest", "--config", str(server.config)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(line_start):
                wait()
                proc.send_signal(signal.SIGINT)
                break
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, out


def test_selftest_interrupted_destroys_its_vm(cbox_factory, tmp_path):
    """SIGINT while the guest boots (an agent that never answers): the VM is destroyed."""
    agent = tmp_path / "silent_agent.py"
    agent.write_text("import time\ntime.sleep(600)\n")
    server = cbox_factory()
    before = host_state(server)
    def agent_step_under_way():
        time.sleep(0.5)

    proc, out = interrupted_selftest(server, "start: vm.boot", agent_step_under_way,
                                     env=dict(os.environ, CBOX_GUEST_AGENT=str(agent)))
    table = rows(out)
    assert proc.returncode == 1, out
    assert table["start"] == ("FAIL", None, "interrupted (Ctrl-C or SIGTERM)"), out
    assert table["start: agent"][0] == "FAIL", out
    assert table["destroy"][0] == "PASS" and table["leftovers"][0] == "PASS", out
    assert host_state(server) == before, out


def test_selftest_interrupted_through_a_server_destroys_its_vm(cbox_factory, tmp_path):
    """The same through a running server: its start goes on until the agent times
    out; selftest then deletes the VM (or finds it gone) and the server is clean."""
    agent = tmp_path / "silent_agent.py"
    agent.write_text("import time\ntime.sleep(600)\n")
    server = cbox_factory(boot_timeout_s=5).start(env={"CBOX_GUEST_AGENT": str(agent)})
    def server_start_waits_for_the_agent():
        deadline = time.monotonic() + 10
        while "step=vm.boot" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)

    proc, out = interrupted_selftest(server, "server", server_start_waits_for_the_agent)
    table = rows(out)
    assert proc.returncode == 1, out
    assert table["start"] == ("FAIL", None, "interrupted (Ctrl-C or SIGTERM)"), out
    assert table["leftovers"][0] == "PASS", out
    assert table["destroy"][0] in ("PASS", "SKIP"), out
    assert server.api.get("/v1/vms")[1] == {"vms": []}
    server.assert_clean()


@pytest.mark.parametrize("device", ["vsock-device", "no-vsock-device"])
def test_selftest_under_qemu(cbox_factory, tmp_path, device):
    """Real images under the QEMU engine. With vhost-device-vsock (the guest's real vsock)
    every step passes; without it (CBOX_VHOST_VSOCK_BIN names a missing program) boot and
    exec pass and the callback step fails with a hint quoting the engine's reason."""
    from test_images import need_vhost_vsock
    need_images(KERNEL, INITRAMFS, ROOTFS)
    need_qemu()
    env = {"CBOX_STANDIN_ENGINE": "qemu"}
    if device == "vsock-device":
        need_vhost_vsock()
    else:
        env["CBOX_VHOST_VSOCK_BIN"] = str(tmp_path / "no-vhost-device-vsock")
    # a copy: Cloud Hypervisor holds an OFD read lock over each disk it has open
    # (block/src/io/fcntl.rs), and QEMU refuses an image another process locked
    rootfs = tmp_path / "rootfs.ext4"
    subprocess.run(["cp", "--sparse=always", str(ROOTFS), str(rootfs)], check=True)
    server = cbox_factory(kernel=str(KERNEL), initramfs=str(INITRAMFS), rootfs=str(rootfs),
                          cmdline_extra="quiet", boot_timeout_s=BOOT_TIMEOUT, stateful_size_in_mb=256,
                          exec_timeout_s=60, shutdown_timeout_s=5)
    before = host_state(server)
    rc, out = selftest(server, env=env)
    table, hint = rows(out), hints(out)
    for step in ("start: vm.boot", "start: agent", "start", "exec", "destroy", "leftovers"):
        assert table[step][0] == "PASS", f"{step}:\n{out}"
    if device == "vsock-device":
        assert rc == 0 and table["callback"][0] == "PASS" and "FAIL" not in out, out
    else:
        assert rc == 1 and table["callback"][0] == "FAIL", out
        assert "vhost-device-vsock not found" in hint["callback"], out
    assert host_state(server) == before, out
