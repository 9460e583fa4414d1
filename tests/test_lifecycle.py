"""How a VM ends (issue 8): resets, panics, power-off, VMM crashes and kills, and the
bounded serial console, through cbox.py's REST API and the stand-in hypervisor.

Everything runs inside a network namespace created per test (contract section 5).
"""
import os
import signal
import time

import pytest

from procutil import wait_for


def wait_stopped(api, name, timeout=20.0):
    """The VM object once it left RUNNING."""
    def stopped():
        status, vm = api.get(f"/v1/vms/{name}")
        assert status == 200, vm
        return vm if vm["status"] != "RUNNING" else None
    return wait_for(stopped, timeout, what=f"VM {name} to stop")


def logs(api, name):
    status, text = api.get(f"/v1/vms/{name}/logs")
    assert status == 200, text
    return text


def assert_runtime_gone(server, name):
    """A stopped VM holds no hypervisor, tap or sockets, answers exec with 409, and
    keeps its record and console until DELETE, which then removes everything."""
    def run_dirs():
        return list(server.run_dir.iterdir()) if server.run_dir.exists() else []
    wait_for(lambda: not server.vmm_pids() and not server.taps() and not run_dirs(), 10,
             what="the VMM, tap and sockets to go")
    status, body = server.api.post(f"/v1/vms/{name}/exec", {"cmd": "true"})
    assert status == 409 and "not running" in body["error"]
    assert (server.state_dir / "vms" / f"{name}.json").exists()
    assert server.api.delete(f"/v1/vms/{name}")[0] == 200
    assert server.api.get(f"/v1/vms/{name}")[0] == 404
    server.assert_clean()


def signal_vmm(server, name, sig):
    """Start VM `name` and send its hypervisor `sig`; the VM object once it stopped."""
    server.api.start_vm(name)
    assert "cbox-agent" in logs(server.api, name)
    [pid] = server.vmm_pids()
    os.kill(pid, sig)
    return wait_stopped(server.api, name)


def test_kill9_of_the_vmm_is_killed(cbox_server):
    api = cbox_server.api
    vm = signal_vmm(cbox_server, "victim", signal.SIGKILL)
    assert (vm["status"], vm["stopReason"]) == ("FAILED", "killed")
    assert "cbox-agent" in logs(api, "victim")          # the console from before stays
    assert_runtime_gone(cbox_server, "victim")
    assert "stopReason=killed" in cbox_server.log()


# reboot(2) RESTART in the process guest's pid namespace kills that namespace's init
# (reboot(2), "pid namespaces"): the stand-in's guest reset. The guard refuses to run
# unless this is a child pid namespace (the host's /proc shows another pid for us);
# in the host's it would reboot the machine.
GUEST_REBOOT = ("sleep 0.3; python3 -c 'import ctypes, os, sys\n"
                "sys.exit(97) if int(os.readlink(\"/proc/self\")) == os.getpid() else None\n"
                "ctypes.CDLL(None, use_errno=True).reboot(0x01234567)'")


def test_guest_reboot_stops_the_vm_and_keeps_its_console(cbox_server):
    api = cbox_server.api
    api.start_vm("rebooter")
    write_console(api, "rebooter", "last words before the reset")
    wait_for(lambda: "last words before the reset" in logs(api, "rebooter"), 10, what="the console line")
    assert api.post("/v1/vms/rebooter/exec", {"cmd": GUEST_REBOOT, "blocking": False})[0] == 200
    vm = wait_stopped(api, "rebooter")
    assert (vm["status"], vm["stopReason"]) == ("STOPPED", "guest-reboot"), vm
    text = logs(api, "rebooter")
    assert "cbox-agent" in text and "last words before the reset" in text
    assert_runtime_gone(cbox_server, "rebooter")
    assert "stopReason=guest-reboot" in cbox_server.log()


def test_guest_panic_is_failed(cbox_server):
    # the stand-in's test hook SIGUSR2: a guest kernel panic, reported through the pvpanic
    # device cbox.py asks for ("pvpanic": true), then the reset panic=-1 makes
    api = cbox_server.api
    vm = signal_vmm(cbox_server, "panicky", signal.SIGUSR2)
    assert (vm["status"], vm["stopReason"]) == ("FAILED", "guest-panic"), vm
    text = logs(api, "panicky")
    assert "cbox-agent" in text and "Kernel panic - not syncing" in text
    assert_runtime_gone(cbox_server, "panicky")


def test_vcpu_error_exit_0_is_a_vcpu_error(cbox_server):
    # the stand-in's test hook SIGUSR1: a vCPU error ends the VMM with exit code 0 and the
    # same events as a guest power-off (vmm/src/cpu.rs, exit_evt); only its log differs,
    # and its words (a record of several lines) are the VM's error
    vm = signal_vmm(cbox_server, "vcpu", signal.SIGUSR1)
    assert (vm["status"], vm["stopReason"]) == ("FAILED", "vcpu-error"), vm
    assert ("error=\"the guest's vCPU failed: VCPU generated error: VcpuRun(Failed to run vcpu Caused by: cbox "
            "stand-in test hook SIGUSR1: simulated KVM_RUN failure)\"") in cbox_server.log()
    assert_runtime_gone(cbox_server, "vcpu")


def test_guest_poweroff_is_stopped(cbox_server):
    # SIGTERM to the guest's init: the agent (PID 1 in a VM) powers the guest off
    api = cbox_server.api
    api.start_vm("bye")
    status, _ = api.post("/v1/vms/bye/exec", {"cmd": "sleep 0.3; kill -TERM 1", "blocking": False})
    assert status == 200
    vm = wait_stopped(api, "bye")
    assert (vm["status"], vm["stopReason"]) == ("STOPPED", "guest-poweroff"), vm
    assert_runtime_gone(cbox_server, "bye")


def test_vmm_exit_0_without_a_guest_poweroff_is_a_crash(cbox_server):
    # SIGTERM makes the VMM leave through the same exit path as a vCPU error (exit code 0,
    # vmm/src/lib.rs EpollDispatch::Exit): exit code 0 alone proves no clean power-off
    vm = signal_vmm(cbox_server, "termed", signal.SIGTERM)
    assert (vm["status"], vm["stopReason"]) == ("FAILED", "vmm-crash"), vm
    assert "exited with code 0 without a guest power-off" in cbox_server.log()
    assert_runtime_gone(cbox_server, "termed")


def test_reset_through_the_vmm_api_stops_the_vm(cbox_server):
    # vm.reboot goes through the same vm_reboot as a guest reset (vmm/src/lib.rs): a "vm
    # rebooting" event, the devices rebuilt in place. cbox.py ends the VM instead.
    api = cbox_server.api
    vm = api.start_vm("rebooted")
    assert "cbox-agent" in logs(api, "rebooted")
    assert cbox_server.vmm_api(vm["cid"], "PUT", "vm.reboot")[0] == 204
    vm = wait_stopped(api, "rebooted")
    assert (vm["status"], vm["stopReason"]) == ("STOPPED", "guest-reboot")
    assert "cbox-agent" in logs(api, "rebooted")
    assert_runtime_gone(cbox_server, "rebooted")


# A command in a process guest (stand-in) writes to its serial console through the
# agent's stdout, a pipe to the stand-in's serial device (in a VM: /dev/ttyS0). The
# guest sees the host's /proc, so /proc/self/stat names the agent by its host pid;
# the checks make sure it is that pipe, never a console of this host.
TO_CONSOLE = ("read -r _ _ _ agent _ < /proc/self/stat; "
              "grep -q guest_agent.py /proc/$agent/cmdline || exit 97; "
              "case $(readlink /proc/$agent/fd/1) in pipe:*) ;; *) exit 98;; esac; ")


def write_console(api, name, text):
    r = api.exec(name, TO_CONSOLE + f"echo '{text}' > /proc/$agent/fd/1")
    assert r["exitCode"] == 0, r


def file_size(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:      # between a rotation's rename and the next write
        return 0


def test_console_flood_is_bounded_and_does_not_slow_other_vms(cbox_factory):
    server = cbox_factory(console_max_bytes=65536).start()
    api = server.api
    started = time.monotonic()
    api.start_vm("noisy")
    api.start_vm("quiet")
    boot = logs(api, "noisy")
    assert "cbox-agent" in boot
    t0 = time.monotonic()
    for _ in range(20):
        api.exec("quiet", "echo ok")
    calm_s = time.monotonic() - t0
    status, flood = api.post("/v1/vms/noisy/exec", {
        "cmd": TO_CONSOLE + "exec yes 'console flood line' > /proc/$agent/fd/1", "blocking": False})
    assert status == 200, flood
    try:
        vm_dir = server.state_dir / "vms" / "noisy"
        wait_for(lambda: (vm_dir / "console.dropped").exists(), 20, what="console rotation")
        t0 = time.monotonic()
        for _ in range(20):
            assert api.exec("quiet", "echo ok")["stdout"] == "ok\n"
        quiet_s = time.monotonic() - t0
        print(f"\n20 execs in the quiet VM: {calm_s * 1000:.0f} ms alone, {quiet_s * 1000:.0f} ms beside the flood")
        assert quiet_s < 20, quiet_s                  # generous: hangs, not speed
        for _ in range(5):
            kept = file_size(vm_dir / "console.log") + file_size(vm_dir / "console.log.1")
            assert kept <= 65536
            assert (vm_dir / "console.boot.log").stat().st_size <= 64 * 1024
            time.sleep(0.2)
        text = logs(api, "noisy")
        assert text.startswith(boot.split("console flood line")[0][:200])
        assert "bytes of console output dropped here" in text
        assert "console flood line\nconsole flood line\n" in text[-100:]
        assert len(text) <= 65536 + 64 * 1024 + 200
        # cbox.py read no more than its per-VM budget allows; the hypervisor dropped the rest
        def console_bytes():      # a rotation between two stats counts a file twice: the least of 3
            names = ("console.boot.log", "console.log", "console.log.1")
            return (sum(file_size(vm_dir / n) for n in names)
                    + int((vm_dir / "console.dropped").read_bytes()))
        read = min(console_bytes() for _ in range(3))
        budget = 2 * 1024 * 1024 + 256 * 1024 * (time.monotonic() - started) + 64 * 1024
        print(f"console bytes read {read}, budget {budget:.0f}")
        assert read <= budget
    finally:
        api.delete(f"/v1/vms/noisy/exec/{flood['execId']}")
    api.delete("/v1/vms")
    server.assert_clean()


def test_restart_keeps_stop_reasons_and_consoles_and_follows_readopted_vms(cbox_factory):
    server = cbox_factory().start()
    api = server.api
    gone = api.start_vm("gone")
    alive = api.start_vm("alive")
    later = api.start_vm("later")
    assert server.vmm_api(gone["cid"], "PUT", "vm.reboot")[0] == 204
    assert wait_stopped(api, "gone")["stopReason"] == "guest-reboot"
    write_console(api, "alive", "written before the restart")
    before = wait_for(lambda: "written before the restart" in logs(api, "alive") and logs(api, "alive"), 10,
                      what="the console line")
    written = server.tmp / "written-while-down"           # the stand-in's guest shares the host's files
    status, _ = api.post("/v1/vms/alive/exec", {"blocking": False, "cmd": "sleep 1; " + TO_CONSOLE +
                                                "echo 'written while cbox.py was down' > /proc/$agent/fd/1; "
                                                f"touch {written}"})
    assert status == 200
    server.stop(signal.SIGKILL)
    # while cbox.py is down: console output, and a reset nobody reads the event of
    assert server.vmm_api(later["cid"], "PUT", "vm.reboot")[0] == 204
    wait_for(written.exists, what="the console line written while cbox.py is down")
    server2 = cbox_factory().start()
    api = server2.api
    vm = api.get("/v1/vms/gone")[1]
    assert (vm["status"], vm["stopReason"]) == ("STOPPED", "guest-reboot")
    assert "cbox-agent" in logs(api, "gone")
    vm = wait_stopped(api, "later")                     # found in the VMM's log at re-adoption
    assert (vm["status"], vm["stopReason"]) == ("STOPPED", "guest-reboot")
    vm = api.get("/v1/vms/alive")[1]
    assert (vm["status"], vm["stopReason"]) == ("RUNNING", None)
    wait_for(lambda: "written while cbox.py was down" in logs(api, "alive"), 10, what="the console replay")
    assert logs(api, "alive").startswith(before)
    assert api.exec("alive", "echo ok")["stdout"] == "ok\n"
    assert server2.vmm_api(alive["cid"], "PUT", "vm.reboot")[0] == 204      # events flow again
    assert wait_stopped(api, "alive")["stopReason"] == "guest-reboot"
    assert api.delete("/v1/vms")[0] == 200
    server2.assert_clean()


def test_vmm_log_is_bounded_on_disk(cbox_factory):
    """A guest can make its VMM log at will (pvpanic writes, virtio device resets are info
    lines at -v). The stand-in's process guests cannot reach their VMM's log, so the test
    writes as Cloud Hypervisor does (its own offset, no O_APPEND); cbox.py frees all but the
    newest part of the file's disk blocks, and the VM and its log's tail stay usable."""
    limit = 2 * 1024 * 1024
    server = cbox_factory(vmm_log_max_bytes=limit).start()
    api = server.api
    api.start_vm("chatty")
    path = server.state_dir / "vms" / "chatty" / "cloud-hypervisor.log"
    fd = os.open(path, os.O_WRONLY)
    try:
        os.lseek(fd, 0, os.SEEK_END)
        line = b"cloud-hypervisor: 1.0s: <vmm> INFO:event_monitor/src/lib.rs:113 -- Event: source = guest event = panic\n"
        for _ in range(24):
            os.write(fd, line * (1024 * 1024 // len(line)))       # 24 MiB
        os.write(fd, b"the newest line\n")
    finally:
        os.close(fd)
    assert os.stat(path).st_size > 20 * 1024 * 1024
    wait_for(lambda: os.stat(path).st_blocks * 512 <= limit, 15, what="cbox.py to free the log's old blocks")
    with open(path, "rb") as f:
        f.seek(-16, os.SEEK_END)
        assert f.read() == b"the newest line\n"
    assert api.exec("chatty", "echo still here")["stdout"] == "still here\n"
    assert "hypervisor log over vmm_log_max_bytes" in server.log()
    assert api.delete("/v1/vms/chatty")[0] == 200
    server.assert_clean()


def test_vms_deleted_together_leave_nothing_and_touch_nothing_else(cbox_server, netns):
    """DELETE /v1/vms tears VMs down together: their taps go in one `ip link del group`
    and their egress chains in one iptables-restore (HostNetwork.remove_taps,
    drop_chains). Everything of theirs goes; interfaces and chains not theirs stay."""
    api = cbox_server.api
    netns.run("ip", "link", "add", "other0", "type", "bridge")           # not cbox's
    netns.run("ip", "link", "set", "other0", "group", "7")
    netns.run("iptables", "-N", "OTHER-CHAIN")
    names = [f"g{i}" for i in range(6)]
    for name in names:
        api.start_vm(name, **({"network": {"egress": "none"}} if name == "g0" else {}))
    assert len(cbox_server.taps()) == 6
    assert netns.run("iptables", "-S").stdout.count("-N CBOX-EG-") == 6
    status, body = api.delete("/v1/vms")
    assert status == 200 and sorted(body["destroyed"]) == names
    cbox_server.assert_clean()
    rules = netns.run("iptables", "-S").stdout
    assert "CBOX-EG-" not in rules and "-N OTHER-CHAIN" in rules
    assert "other0" in netns.links() and "group 7" in netns.run("ip", "-d", "link", "show", "other0").stdout
    assert netns.run("ip", "neigh", "show", "nud", "permanent").stdout.strip() == ""
