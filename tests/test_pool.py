"""The warm pool (config pool_size): VMs booted ahead of time, claimed by start requests.

Stand-in hypervisor inside a network namespace per test (contract section 5)."""
import json
import os
import signal
import sys
import time

import pytest

from conftest import REPO
from procutil import wait_for

CLI = [sys.executable, str(REPO / "cbox.py"), "--server", "http://127.0.0.1:7000"]


def pool(api):
    status, body = api.get("/v1/health")
    assert status == 200
    return body["pool"]


def wait_ready(api, ready, timeout=60):
    return wait_for(lambda: pool(api)["ready"] == ready and pool(api)["booting"] == 0 and pool(api),
                    timeout=timeout, what=f"{ready} pool VM(s) ready")


def records(server):
    vms = server.state_dir / "vms"
    return sorted(p.name for p in vms.glob("*.json")) if vms.exists() else []


def pool_records(server):
    return [n for n in records(server) if n.startswith("_pool-")]


# the other children of the agent's server (the command's parent): none in a fresh VM
# (the stand-in's guests share the host's /proc: their own processes are found this way)
OTHERS = 'for p in $(cat /proc/$PPID/task/*/children); do [ "$p" = $$ ] || cat /proc/$p/cmdline; done; echo end'


def test_pooled_start_is_the_requested_vm(cbox_factory, callback_server):
    cb = callback_server(lambda body: (200, json.dumps({"result": body["vmName"]}).encode()))
    server = cbox_factory(pool_size=1, destroy_on_exit=True).start()
    api = server.api
    assert wait_ready(api, 1) == {"size": 1, "ready": 1, "booting": 0, "lastError": None,
                                  "images": {"default": {"size": 1, "ready": 1, "booting": 0}}}
    assert api.get("/v1/vms") == (200, {"vms": []})                 # the pool is invisible
    assert len(pool_records(server)) == 1 and len(server.taps()) == 1
    # a cold VM beside it, to compare with (memoryMb differs from the default: boots cold)
    api.start_vm("cold", memoryMb=256)
    t0 = time.monotonic()
    vm = api.start_vm("warm", callbackUrl=cb.url, labels={"team": "a"}, ttlSeconds=600, idleTimeoutSeconds=300,
                      network={"egress": "none"}, callbackMethods=["whoami"])
    claim_s = time.monotonic() - t0
    assert vm["vmName"] == "warm" and vm["status"] == "RUNNING" and vm["labels"] == {"team": "a"}
    assert vm["callbackUrl"] == cb.url and vm["callbackMethods"] == ["whoami"]
    assert vm["network"] == {"egress": "none", "allowOut": []} and vm["idleTimeoutSeconds"] == 300
    assert vm["expiresAt"] and vm["vcpus"] == 1 and vm["memoryMb"] == 512
    assert "claim step vm=warm" in server.log(), "not a pooled start"
    assert claim_s < 10                                             # no boot (a hang guard, not a speed test)
    # the guest and its agent use the new name; callbacks carry it, to the new URL
    r = api.exec("warm", 'hostname; echo "$CBOX_VM_NAME"; cbox_callback whoami')
    assert r["exitCode"] == 0, r
    assert r["stdout"].splitlines() == ["warm", "warm", '"warm"']
    assert cb.calls[-1]["vmName"] == "warm" and cb.calls[-1]["method"] == "whoami"
    # the egress policy of the request is in force on the VM's tap
    rules = server.ns.run("iptables", "-S").stdout
    assert f"CBOX-EG-{vm['tapDeviceName']}" in rules
    # indistinguishable from a fresh VM: nothing ran in it before, nothing else runs
    assert api.get("/v1/vms/cold/exec") == (200, {"execs": []})
    assert [e["cmd"] for e in api.get("/v1/vms/warm/exec")[1]["execs"]] == []
    assert api.exec("warm", OTHERS)["stdout"] == api.exec("cold", OTHERS)["stdout"] == "end\n"
    # listed under its name only; its record is named by it; the pool refills
    listed = {v["vmName"]: v for v in api.get("/v1/vms")[1]["vms"]}
    assert sorted(listed) == ["cold", "warm"]
    assert api.get("/v1/vms?label=team=a")[1]["vms"][0]["vmName"] == "warm"
    wait_ready(api, 1)
    assert "warm.json" in records(server) and len(pool_records(server)) == 1
    record = json.loads((server.state_dir / "vms" / "warm.json").read_text())
    assert record["dirName"].startswith("_pool-") and record["vmName"] == "warm"
    assert not (server.state_dir / "vms" / (record["dirName"] + ".json")).exists()
    # DELETE /v1/vms leaves the pool alone; a VM of the pool's name cannot be asked for
    status, body = api.delete("/v1/vms")
    assert status == 200 and sorted(body["destroyed"]) == ["cold", "warm"]
    assert pool(api)["ready"] == 1 and len(server.taps()) == 1
    assert api.get(f"/v1/vms/{pool_records(server)[0][:-5]}")[0] == 400
    status, metrics = api.get("/v1/metrics")
    assert "cbox_pool_claims_total 1" in metrics and "cbox_pool_ready 1" in metrics
    assert 'cbox_pool_cold_starts_total{reason="shape"} 1' in metrics
    server.stop()                                                   # destroy_on_exit: the pool goes too
    server.assert_clean()


def test_pool_counts_in_capacity_and_refills(cbox_factory):
    server = cbox_factory(pool_size=1, max_vms=2).start()
    api = server.api
    wait_ready(api, 1)
    api.start_vm("a")                                               # claimed; the pool boots another
    wait_ready(api, 1)
    assert "claim step vm=a" in server.log()
    assert len(server.taps()) == 2
    api.start_vm("b")                                               # claimed; no room left to refill
    assert "claim step vm=b" in server.log()
    state = wait_for(lambda: pool(api)["lastError"] and pool(api), what="the pool to say why it is short")
    assert state == {"size": 1, "ready": 0, "booting": 0,
                     "lastError": "no room for a pool VM: max_vms (2) VMs are running",
                     "images": {"default": {"size": 1, "ready": 0, "booting": 0}}}, state
    status, body = api.post("/v1/vms", {"vmName": "c"})
    assert status == 503 and "max_vms" in body["error"], body
    assert server.ns.run(*CLI, "health").stdout.splitlines() == [
        "healthy: cbox.py 0.1.0, 2 VM(s)",
        "warm pool: 0 of 1 ready, 0 booting; last error: no room for a pool VM: max_vms (2) VMs are running"]
    assert [line.split()[0] for line in server.ns.run(*CLI, "vm", "ls").stdout.splitlines()] == ["NAME", "a", "b"]
    api.delete("/v1/vms/a")
    assert wait_ready(api, 1)["lastError"] is None                  # capacity freed: the pool refills
    # a start of another shape makes room by destroying the ready pool VM
    vm = api.start_vm("big", memoryMb=256)
    assert vm["memoryMb"] == 256 and "start step vm=big step=vm.boot" in server.log()
    assert pool(api)["ready"] == 0 and len(server.taps()) == 2


def test_empty_pool_and_other_shapes_boot_cold(cbox_factory):
    server = cbox_factory(pool_size=1, boot_timeout_s=30).start()
    api = server.api
    wait_ready(api, 1)
    api.start_vm("x", vcpus=2)
    assert "start step vm=x step=vm.boot" in server.log() and pool(api)["ready"] == 1
    api.start_vm("y")                                               # claims the ready one
    api.start_vm("z")                                               # the refill may not be ready: cold or pooled
    assert "start step vm=y step=vm.boot" not in server.log()
    r = api.exec("z", "hostname")
    assert r["stdout"] == "z\n"
    status, metrics = api.get("/v1/metrics")
    assert 'cbox_pool_cold_starts_total{reason="shape"} 1' in metrics


def test_pool_survives_a_restart_and_shrinks(cbox_factory):
    server = cbox_factory(pool_size=2).start()
    api = server.api
    wait_ready(api, 2)
    before = sorted(pool_records(server))
    pids = sorted(server.vmm_pids())
    server.stop(signal.SIGKILL)
    server = cbox_factory(pool_size=2).start()
    api = server.api
    assert pool(api)["ready"] == 2 and sorted(pool_records(server)) == before    # re-adopted, not rebooted
    assert sorted(server.vmm_pids()) == pids and api.get("/v1/vms") == (200, {"vms": []})
    vm = api.start_vm("after")
    assert "claim step vm=after" in server.log()
    assert api.exec("after", "hostname")["stdout"] == "after\n"
    wait_ready(api, 2)
    server.stop()                                                   # left running (no destroy_on_exit)
    server = cbox_factory(pool_size=1).start()                      # smaller pool: the extra one goes
    api = server.api
    assert pool(api)["ready"] == 1 and len(pool_records(server)) == 1
    assert [v["vmName"] for v in api.get("/v1/vms")[1]["vms"]] == ["after"]
    assert len(server.vmm_pids()) == 2 and len(server.taps()) == 2
    assert api.exec("after", "hostname")["stdout"] == "after\n" and vm["cid"] == api.get("/v1/vms/after")[1]["cid"]
    server.stop()
    server = cbox_factory(pool_size=0, destroy_on_exit=True).start()
    assert pool(server.api)["ready"] == 0 and pool_records(server) == []
    server.stop()
    server.assert_clean()


def test_restart_between_the_records_of_a_claim(cbox_factory):
    """A claim writes the claimed VM's record before removing the pool's: a restart between
    the two finds both; the claimed VM is adopted under its name, the pool record dropped."""
    server = cbox_factory(pool_size=1).start()
    api = server.api
    wait_ready(api, 1)
    pool_record = server.state_dir / "vms" / pool_records(server)[0]
    saved = pool_record.read_bytes()
    api.start_vm("half")
    server.stop(signal.SIGKILL)
    pool_record.write_bytes(saved)                                  # as if killed before its removal
    server = cbox_factory(pool_size=1, destroy_on_exit=True).start()
    api = server.api
    assert [v["vmName"] for v in api.get("/v1/vms")[1]["vms"]] == ["half"]
    assert not pool_record.exists()
    assert api.exec("half", "hostname")["stdout"] == "half\n"
    wait_ready(api, 1)
    assert len(server.vmm_pids()) == 2
    server.stop()
    server.assert_clean()


def test_failing_pool_boot_is_cleaned_up_and_reported(cbox_factory):
    # the stand-in's guest agent exits at once: every pool boot fails at the agent step
    server = cbox_factory(pool_size=1, boot_timeout_s=2, destroy_on_exit=True).start(
        env={"CBOX_GUEST_AGENT": "/bin/false"})
    api = server.api
    state = wait_for(lambda: pool(api)["lastError"] and pool(api), timeout=30, what="a failed pool boot")
    assert state["ready"] == 0 and "agent" in state["lastError"], state
    assert "; last error: " in server.ns.run(*CLI, "health").stdout
    wait_for(lambda: not server.taps() and not pool_records(server) or None, timeout=10, what="cleanup")
    status, metrics = api.get("/v1/metrics")
    assert "cbox_pool_boot_failures_total 0" not in metrics
    server.stop()
    server.assert_clean()


# the other processes of a real guest: everything but the kernel's threads (kthreadd, pid 2,
# and its children), as "command parent-command" lines; the ps of this very exec left out
GUEST_PROCESSES = ("ps -N --ppid 2 --pid 2 -o pid=,ppid=,comm= | while read pid ppid comm; do "
                   '[ "$pid" = $$ ] || [ "$ppid" = $$ ] || echo "$comm $(cat /proc/$ppid/comm 2>/dev/null)"; '
                   "done | sort")


def test_pooled_start_of_a_real_guest(cbox_factory):
    """The QEMU engine: a real kernel and the out/ rootfs (its agent must have POST /identity:
    `make rootfs` after changing guest_agent.py). A pooled VM is named like a cold one and runs
    the same processes."""
    from test_images import BOOT_TIMEOUT, INITRAMFS, KERNEL, ROOTFS, image_server, need_images, need_qemu
    need_images(KERNEL, INITRAMFS, ROOTFS)
    need_qemu()
    server = image_server(cbox_factory, pool_size=1, destroy_on_exit=True)
    api = server.api
    wait_ready(api, 1, timeout=BOOT_TIMEOUT + 30)
    status, vm = api.post("/v1/vms", {"vmName": "realpool", "labels": {"k": "v"}}, timeout=60)
    assert status == 200, vm
    assert "claim step vm=realpool" in server.log()
    r = api.exec("realpool", 'hostname; cat /etc/hostname; echo "$CBOX_VM_NAME"')
    assert r["stdout"] == "realpool\nrealpool\nrealpool\n", r
    status, cold = api.post("/v1/vms", {"vmName": "realcold", "memoryMb": 256}, timeout=BOOT_TIMEOUT + 30)
    assert status == 200, cold
    pooled_ps, cold_ps = (api.exec(name, GUEST_PROCESSES)["stdout"] for name in ("realpool", "realcold"))
    assert pooled_ps == cold_ps and "python3" in pooled_ps, (pooled_ps, cold_ps)
    assert api.get("/v1/vms/realpool/logs")[1].count("identity: vm=realpool") == 1
    server.stop()
    server.assert_clean()


# The real agent, but its POST /identity answers as a hostile guest would (HOSTILE_IDENTITY).
HOSTILE_IDENTITY_AGENT = r'''
import os, sys, time
sys.path.insert(0, os.environ["AGENT_DIR"])
import guest_agent

def set_identity(self, request):
    mode = os.environ["HOSTILE_IDENTITY"]
    if mode == "hang":
        time.sleep(60)
    if mode == "huge":
        return {"vmName": "x" * 100000}
    return {"vmName": "someone-else", "hostname": "someone-else"}

guest_agent.AgentServer.set_identity = set_identity
sys.exit(guest_agent.main([sys.argv[0]] + sys.argv[1:]))
'''


@pytest.mark.parametrize("mode", ["wrong", "huge", "hang"])
def test_a_hostile_identity_answer_fails_the_claim_and_the_start_boots(cbox_factory, tmp_path, mode):
    agent = tmp_path / "hostile_identity_agent.py"
    agent.write_text(HOSTILE_IDENTITY_AGENT)
    server = cbox_factory(pool_size=1, destroy_on_exit=True).start(env={
        "CBOX_GUEST_AGENT": str(agent), "AGENT_DIR": str(REPO), "HOSTILE_IDENTITY": mode,
        "CBOX_STANDIN_PASS_ENV": "AGENT_DIR,HOSTILE_IDENTITY"})
    api = server.api
    wait_ready(api, 1)
    t0 = time.monotonic()
    vm = api.start_vm("h")
    assert time.monotonic() - t0 < 30                       # the agent's answer is awaited 5 s at most
    assert vm["status"] == "RUNNING" and "claiming a pool VM failed; booting one vm=h" in server.log()
    assert "start step vm=h step=vm.boot" in server.log()
    assert api.exec("h", "hostname")["stdout"] == "h\n"
    assert [v["vmName"] for v in api.get("/v1/vms")[1]["vms"]] == ["h"]
    wait_ready(api, 1)                                      # the failed pool VM is gone, another boots
    assert len(server.taps()) == 2 and len(pool_records(server)) == 1
    assert 'cbox_pool_cold_starts_total{reason="failed"} 1' in api.get("/v1/metrics")[1]
    server.stop()
    server.assert_clean()


def test_a_pool_vm_that_dies_is_replaced(cbox_factory):
    server = cbox_factory(pool_size=1, destroy_on_exit=True).start()
    api = server.api
    wait_ready(api, 1)
    (old,) = pool_records(server)
    (pid,) = server.vmm_pids()
    os.kill(pid, signal.SIGKILL)                            # its hypervisor dies
    wait_for(lambda: pool_records(server) not in ([], [old]) and pool(api)["ready"] == 1, timeout=30,
             what="another pool VM")
    assert len(server.taps()) == 1 and len(server.vmm_pids()) == 1
    assert not (server.state_dir / "vms" / old[:-5]).exists()
    assert api.get("/v1/events")[1]["events"] == []         # not a VM of the API: no vm.stopped
    assert api.start_vm("next")["vmName"] == "next" and "claim step vm=next" in server.log()
    server.stop()
    server.assert_clean()
